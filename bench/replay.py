"""The floor for the benchmark: a TLS server that answers every request with
one prebuilt response archive.

It speaks the compile-server wire protocol the way stapsrv does (same TLS
stack and settings, same certificate and key, read from an stapsrv ssl
directory: ``stap.cert`` DER and ``stap-key.pem``), reads the client's
length-prefixed request with stapsrv's own RequestReader, and then sends
the stored response bytes and closes.  No unpacking, no translator, no
signing: what is left is the stap client's own cost plus one TLS round
trip, which no server can beat with this client.

    python bench/replay.py --ssl DIR --response server.zip --log LOG [--port 0]

Listens on 127.0.0.1 only and logs ``Using network address [127.0.0.1]:PORT``
(the line tests/realserver.py waits for).  A zero length (``stap
--trust-servers`` probe) is answered by closing, as the real servers do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.protocols.tls import TLSMemoryBIOFactory  # noqa: E402

from stapsrv.core.framing import (  # noqa: E402
    CertificateProbe,
    RequestReader,
    RequestReceived,
)
from stapsrv.identity.certs import ServerIdentity, server_context_factory  # noqa: E402
from stapsrv.identity.store import CERT_FILE, KEY_FILE  # noqa: E402

#: Same ceiling as stapsrv's default --max-compressed-request is irrelevant
#: here: the bench only sends small requests.
MAX_REQUEST = 64 * 1024 * 1024


class ReplayProtocol(Protocol):
    factory: ReplayFactory

    def connectionMade(self) -> None:
        self.reader = RequestReader(MAX_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        event = self.reader.feed(data)
        if event is None:
            return
        if isinstance(event, RequestReceived):
            self.factory.served += 1
            self.transport.write(self.factory.response)
        elif not isinstance(event, CertificateProbe):
            self.factory.log(f"unexpected request event {event!r}")
        self.transport.loseConnection()


class ReplayFactory(Factory):
    protocol = ReplayProtocol
    noisy = False

    def __init__(self, response: bytes, log_path: Path) -> None:
        self.response = response
        self.log_path = log_path
        self.served = 0

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


def load_identity(ssl_dir: Path) -> ServerIdentity:
    certificate = x509.load_der_x509_certificate((ssl_dir / CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((ssl_dir / KEY_FILE).read_bytes(), password=None)
    return ServerIdentity(key, certificate)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ssl", type=Path, required=True,
                        help="stapsrv ssl directory (stap.cert, stap-key.pem)")
    parser.add_argument("--response", type=Path, required=True,
                        help="response zip to send for every request")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    factory = ReplayFactory(options.response.read_bytes(), options.log)
    tls = TLSMemoryBIOFactory(server_context_factory(load_identity(options.ssl)), False, factory)
    port = reactor.listenTCP(options.port, tls, backlog=50, interface="127.0.0.1")
    factory.log(f"Using network address [127.0.0.1]:{port.getHost().port}")
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: factory.log(f"served {factory.served} requests"))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
