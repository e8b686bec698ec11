"""System-wide trust for an installed server (used by ``make install-system``).

``python -m stapsrv.cli.systemtrust identity SSL_DIR`` makes sure the server's
certificate exists (run it as the server user); ``python -m
stapsrv.cli.systemtrust trust CERT DB_DIR...`` (as root) adds it to NSS
databases such as ``/etc/systemtap/ssl/client`` (every local user's
clients trust the server) and ``/etc/systemtap/staprun`` (``staprun``
accepts modules it signed), as 4.8's packaging does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stapsrv.identity.store import load_or_create_identity
from stapsrv.identity.trust import CertutilError, trust_certificate


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "identity":
        identity = load_or_create_identity(Path(argv[1]))
        print(identity.serial_text)
        return 0
    if len(argv) >= 3 and argv[0] == "trust":
        try:
            for database in argv[2:]:
                trust_certificate(Path(argv[1]), Path(database))
        except (CertutilError, OSError) as exc:
            print(f"systemtrust: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m stapsrv.cli.systemtrust identity SSL_DIR | trust CERT DB_DIR...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
