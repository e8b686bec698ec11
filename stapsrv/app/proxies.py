"""Only trusted proxies may send a PROXY protocol header (``--proxy-from``).

A ``haproxy:`` endpoint believes the client address its PROXY header
names, so a peer that reached the port directly could claim any address
and pass the ``--allow`` list.  Here the real TCP peer is judged when the
connection is accepted, under the PROXY reader: a peer outside the trusted
networks gets no protocol at all, so the listening port closes the socket
before anything is read from it, and the server logs one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

from stapsrv.app.server import describe_peer, peer_host
from stapsrv.app.wrapping import GateFactory
from stapsrv.core.logtext import escape_controls
from stapsrv.core.policyvalues import Network, in_networks


class TrustedPeersFactory(GateFactory):
    """Builds ``wrapped``'s protocols for peers in ``networks``, none (so
    the connection is closed unread) for the others."""

    def __init__(self, wrapped: IProtocolFactory, networks: Sequence[Network],
                 log: Logger, refused: Callable[[], None] | None = None) -> None:
        super().__init__(wrapped)
        self.networks = tuple(networks)
        self.log = log
        self.refused = refused

    def trusts(self, address: IAddress) -> bool:
        return in_networks(peer_host(address), self.networks)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if self.trusts(addr):
            return self.wrapped.buildProtocol(addr)
        self.log.info("Closed a connection from {peer}: not a trusted proxy (--proxy-from), "
                      "so its PROXY header is not read",
                      peer=escape_controls(describe_peer(addr)))
        if self.refused is not None:
            self.refused()
        return None


@implementer(IStreamServerEndpoint)
class TrustedPeersEndpoint:
    """``endpoint``, accepting connections only from ``networks``."""

    def __init__(self, endpoint: IStreamServerEndpoint, networks: Sequence[Network],
                 log: Logger, refused: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self.networks = tuple(networks)
        self.log = log
        self.refused = refused

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        gate = TrustedPeersFactory(protocolFactory, self.networks, self.log, self.refused)
        result: Deferred[IListeningPort] = self.endpoint.listen(gate)
        return result


def trusted_proxy_endpoint(stream: IStreamServerEndpoint, networks: Sequence[Network],
                           log: Logger, refused: Callable[[], None] | None = None
                           ) -> IStreamServerEndpoint:
    """The PROXY protocol reader over ``stream``, for peers in ``networks``
    only: the gate judges each accepted socket before the reader sees it."""
    endpoint: IStreamServerEndpoint = proxyEndpoint(
        TrustedPeersEndpoint(stream, networks, log, refused))
    return endpoint
