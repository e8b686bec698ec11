"""A peer that writes its own PROXY protocol header: what anyone who can
reach a ``haproxy:`` port directly could do.

It listens on loopback and relays each connection (a real stap client's)
to a server, connecting from a chosen loopback address and starting with
a PROXY v1 header that claims another client address.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure


class _Outbound(Protocol):
    """Towards the server: the forged header, then the client's bytes."""

    def __init__(self, inbound: _Inbound, header: bytes) -> None:
        self.inbound = inbound
        self.header = header

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.header)

    def dataReceived(self, data: bytes) -> None:
        assert self.inbound.transport is not None
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.loseConnection()


class _Inbound(Protocol):
    """From the client: held until the connection to the server is up."""

    factory: ForgedProxy

    def __init__(self) -> None:
        self.outbound: _Outbound | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        relay = self.factory
        client = self.transport.getPeer()
        header = (f"PROXY TCP4 {relay.claimed} 127.0.0.1 {client.port} "  # type: ignore[attr-defined]
                  f"{relay.server_port}\r\n").encode()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.server_port, timeout=10,
                                      bindAddress=(relay.source, 0))
        connectProtocol(  # type: ignore[no-untyped-call]
            endpoint, _Outbound(self, header)).addCallbacks(
            self._connected, lambda _: self.transport.loseConnection())

    def _connected(self, outbound: _Outbound) -> None:
        self.outbound = outbound
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.loseConnection()


class ForgedProxy(Factory):
    """Relays to 127.0.0.1:``server_port`` from ``source``, claiming ``claimed``."""

    protocol = _Inbound  # type: ignore[assignment]
    noisy = False

    def __init__(self, server_port: int, source: str, claimed: str) -> None:
        self.server_port = server_port
        self.source = source
        self.claimed = claimed
        self.port: IListeningPort | None = None

    @property
    def spec(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]


async def start_forged_proxy(test: object, server_port: int, source: str,
                             claimed: str) -> ForgedProxy:
    relay = ForgedProxy(server_port, source, claimed)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")  # type: ignore[no-untyped-call]
    relay.port = await endpoint.listen(relay)  # type: ignore[no-untyped-call]
    test.addCleanup(relay.port.stopListening)  # type: ignore[attr-defined]
    return relay
