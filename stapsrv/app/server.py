"""Twisted Protocol and Factory around the sans-IO request reader.

The handler's gate bounds the translator runs (``--max-threads``); a
connection holds no slot while it sends its request or when its answer
comes from the cache, so idle or slow connections cannot starve real
clients.  Instead each connection must finish its TLS handshake and upload
within ``request_timeout`` seconds, and must take its answer within as long
again, or it is cut off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from OpenSSL import SSL
from twisted.python.failure import Failure
from zope.interface import implementer

from stapsrv import PROTOCOL_VERSION
from stapsrv.app.admission import OLDEST, PEER, Admission
from stapsrv.compile.archive import refusal_archive
from stapsrv.compile.context import RequestContext
from stapsrv.compile.handler import RequestHandler
from stapsrv.core.admission import default_per_peer
from stapsrv.core.budget import share_key
from stapsrv.core.framing import (
    CertificateProbe,
    RequestEvent,
    RequestReader,
    RequestReceived,
    RequestTooLarge,
    RequestTruncated,
)
from stapsrv.core.tlsrefusal import certificate_refusal, refusal_message


def peer_host(address: IAddress) -> str:
    """The client's address (an IPv4 client of an IPv6 socket as IPv4)."""
    host = str(getattr(address, "host", "?"))
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host


def peer_share(address: IAddress) -> str:
    """What the client counts as for its shares (an IPv6 host: its /64)."""
    return share_key(peer_host(address))


def describe_peer(address: IAddress) -> str:
    host = peer_host(address)
    port = getattr(address, "port", "?")
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


#: Seconds after its accept during which a connection is still arriving (its
#: TLS handshake and upload under way) rather than idle.
ARRIVING = 2.0


@implementer(IHandshakeListener)
class CompileServerProtocol(Protocol):
    """One client connection: read the request, answer, close."""

    factory: CompileServerFactory

    @property
    def log(self) -> Logger:
        return self.factory.log

    @property
    def connection(self) -> ITCPTransport:
        """The connected transport: TLS over TCP (``ITransport`` is all
        ``Protocol`` promises; ours can also be aborted)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def __init__(self) -> None:
        self._reader: RequestReader | None = None
        self._context: RequestContext | None = None
        self._closed = False
        self._work: Deferred[Any] | None = None
        self._deadline: IDelayedCall | None = None
        self._close_waiters: list[Deferred[None]] = []
        #: The peer is not in the --allow list: its request gets the refusal.
        self._refusal: str | None = None
        self._admitted = False
        self.accepted_at = 0.0
        #: It has not completed a request, nor is it closing: see
        #: ``waiting_since``.
        self._waiting = False
        #: The address its peer was counted under (``factory.peers``).
        self._counted: str | None = None

    def when_closed(self) -> Deferred[None]:
        """A new Deferred that fires once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
        else:
            self._close_waiters.append(d)
        return d

    @property
    def handling(self) -> bool:
        """The request is in and its answer is not ready yet."""
        return self._work is not None

    @property
    def busy(self) -> bool:
        """A request is being processed (or its answer is being sent)."""
        return self._work is not None or (self._context is not None and not self._closed)

    @property
    def waiting_since(self) -> float | None:
        """When this connection was accepted, if it has not completed a
        request: admission closes those accepted longest ago first (not
        those that sent a byte least recently: a client dripping a byte at
        a time would always look newer than one in its TLS handshake)."""
        return None if self._closed or not self._waiting else self.accepted_at

    @property
    def waiting_peer(self) -> str | None:
        """The address this connection counts under (None: not known yet)."""
        return self._counted

    def evict(self) -> None:
        """Admission needs this connection's descriptor for new clients."""
        self._waiting = False
        self._disarm_deadline()
        self.factory.closed_early(OLDEST, self._counted)
        self.connection.abortConnection()

    def abandon(self) -> None:
        """Shutdown ran out of patience: stop this request and disconnect."""
        if self._context is not None:
            self._context.abandon()
        self.connection.abortConnection()

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.accepted_at = self.factory.clock.seconds()
        self._waiting = True
        self.peer = describe_peer(self.connection.getPeer())
        self._reader = RequestReader(self.factory.handler.config.max_compressed_request)
        self._admitted = False
        if not self.factory.proxied:
            self._admit()
        self._arm_deadline("Timed out waiting for the request from {peer}")
        if self.factory.admission is not None and not self._closed:
            self.factory.admission.opened(self)

    def _admit(self) -> None:
        """Log the client and apply the --allow list to its address.  Behind
        a proxy that address is only known once the PROXY header is read,
        before the TLS handshake: so then this waits for the handshake to
        complete (the proxy's health checks, which do not shake hands, are
        then not logged)."""
        self._admitted = True
        address = self.connection.getPeer()
        self.peer = describe_peer(address)
        host = peer_host(address)
        if not self.factory.peer_admits(host):
            # Behind a proxy (without one, the gate under TLS refused it).
            self._waiting = False
            self._disarm_deadline()
            self.factory.closed_early(PEER, share_key(host))
            self.connection.abortConnection()
            return
        self._counted = share_key(host)
        self.factory.peers[self._counted] += 1
        self.log.info("Accepted connection from {peer}", peer=self.peer)
        policy = self.factory.handler.policy
        if not policy.admits(host):
            self._refusal = policy.peer_refusal(host)
            self.log.info("Refusing {peer}: not in the --allow list", peer=self.peer)

    def _arm_deadline(self, message: str) -> None:
        """Cut the connection off unless it is gone within the request timeout."""
        self._disarm_deadline()
        timeout = self.factory.handler.config.request_timeout
        if timeout > 0:
            self._deadline = self.factory.clock.callLater(timeout, self._expired, message)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self, message: str) -> None:
        self._deadline = None
        self.log.info(message, peer=self.peer)
        self.connection.abortConnection()

    def handshakeCompleted(self) -> None:
        """TLS is up (so behind a proxy its PROXY header has been read)."""
        if not self._admitted:
            self._admit()

    def dataReceived(self, data: bytes) -> None:
        assert self._reader is not None
        if not self._admitted:
            self._admit()
        if self._counted is None:
            return  # closed: its peer holds its share already
        event = self._reader.feed(data)
        if event is not None:
            self._dispatch(event)

    def _dispatch(self, event: RequestEvent) -> None:
        self._waiting = False
        if isinstance(event, CertificateProbe):
            self.connection.loseConnection()
        elif isinstance(event, RequestTooLarge):
            self.log.info("Error size of (compressed) request file is too large "
                          "({size} bytes; the limit is {limit})",
                          size=event.size, limit=event.limit)
            if event.drained:
                self.connection.write(refusal_archive(event.client_message, PROTOCOL_VERSION))
            self.connection.loseConnection()
        elif isinstance(event, RequestTruncated):
            self.log.info("Expected {expected} bytes, got {received} while reading "
                          "client request from socket",
                          expected=event.expected, received=event.received)
        elif isinstance(event, RequestReceived) and self._refusal is not None:
            self._disarm_deadline()
            self.connection.write(refusal_archive(self._refusal, PROTOCOL_VERSION))
            self.connection.loseConnection()
        elif isinstance(event, RequestReceived):
            self._disarm_deadline()
            self.factory.log_load()
            self._context = RequestContext(self.peer)
            self._work = Deferred.fromCoroutine(
                self.factory.handler.handle(event.body, self._context))
            self._work.addCallbacks(self._respond, self._failed)

    def _respond(self, response: bytes | None) -> None:
        self._work = None
        if self._closed:
            return
        if response is not None:
            self.connection.write(response)
            self.log.info("Request from {peer} complete", peer=self.peer)
            # A client that will not read its answer must not pin it here.
            self._arm_deadline("Timed out sending the answer to {peer}")
        self.connection.loseConnection()

    def _failed(self, failure: Failure) -> None:
        self._work = None
        self.log.failure("Error processing client request from {peer}", failure,
                         peer=self.peer)
        if not self._closed:
            self.connection.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._log_refusal(reason)
        if self._reader is not None:
            event = self._reader.connection_lost()
            if event is not None:
                self._dispatch(event)
        self._disarm_deadline()
        if self._context is not None and self._work is not None:
            self._context.abandon()
        self.factory.connections.discard(self)
        if self._counted is not None:
            self.factory.peers[self._counted] -= 1
            if self.factory.peers[self._counted] <= 0:
                del self.factory.peers[self._counted]
            self._counted = None
        if self.factory.admission is not None:
            self.factory.admission.closed(self)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


    def _log_refusal(self, reason: Failure) -> None:
        """Say so when the client ended the handshake because it does not
        trust the certificate (:mod:`stapsrv.core.tlsrefusal`)."""
        if not reason.check(SSL.Error):
            return
        refusal = certificate_refusal(str(reason.value))
        if refusal is not None:
            self.log.info("Client {peer} " + refusal_message(refusal), peer=self.peer)


class CompileServerFactory(Factory[CompileServerProtocol]):
    """Builds connection protocols sharing one handler."""

    protocol = CompileServerProtocol
    noisy = False

    def __init__(self, handler: RequestHandler, clock: IReactorTime | None = None,
                 admission: Admission | None = None) -> None:
        self.handler = handler
        self.clock: IReactorTime = clock or handler.reactor
        self.log = Logger(namespace=handler.config.log_namespace, source=self)
        self.limit = handler.config.max_threads
        self.gate: DeferredSemaphore = handler.gate
        self.connections: set[CompileServerProtocol] = set()
        #: Clients' addresses come from a PROXY protocol header.
        self.proxied = handler.config.proxied
        #: The process's admission (None: connections are not limited).
        self.admission = admission
        #: Open connections by peer address (counted once it is known).
        self.peers: Counter[str] = Counter()
        #: Called with the reason of each connection closed early (metrics).
        self.on_closed_early: list[Callable[[str], None]] = []

    @property
    def per_peer(self) -> int:
        """Connections one peer address may hold (0: no cap; there is none
        without admission)."""
        if self.admission is None:
            return 0
        configured = self.handler.config.max_peer_connections
        if configured is not None:
            return configured
        return default_per_peer(self.admission.descriptors.limit)

    def peer_admits(self, host: str) -> bool:
        """A new connection from ``host`` may stay (an IPv6 host counts with
        the rest of its /64)."""
        if self.admission is None:
            return True
        return self.admission.policy(self.per_peer).peer_admits(self.peers[share_key(host)])

    def closed_early(self, reason: str, host: str | None) -> None:
        """A connection was closed to keep room for others (``reason``: see
        :mod:`stapsrv.app.admission`)."""
        if self.admission is not None:
            self.admission.refused(reason, host)
        for listener in self.on_closed_early:
            listener(reason)

    @property
    def waiting(self) -> int:
        """Requests waiting for a translator slot."""
        return len(self.gate.waiting)

    def log_load(self) -> None:
        """4.8's load line for a new request (none when concurrency is
        disabled), from the requests already being handled.  4.8 logged it
        on accept, when each connection took a thread; here it is logged
        when a request is in, since idle connections take nothing."""
        if self.limit <= 0:
            return
        ahead = sum(1 for connection in self.connections if connection.handling)
        if ahead >= self.limit:
            self.log.info("Server is overloaded. Processing times may be longer than normal.")
        elif ahead == 0:
            self.log.info("Processing 1 request...")
        else:
            self.log.info("Processing {count} concurrent requests...", count=ahead + 1)

    async def drain(self, clock: IReactorTime, grace: float) -> None:
        """Let requests in progress finish (their clients get their modules),
        and connections accepted in the last ``ARRIVING`` seconds send theirs
        (so that a client a load balancer sent here just before the stop is
        served); drop idle connections, and force the rest after ``grace``."""
        now = self.clock.seconds()
        arriving = {connection for connection in self.connections
                    if now - connection.accepted_at < ARRIVING}
        busy = [connection for connection in self.connections
                if connection.busy or connection in arriving]
        for connection in list(self.connections):
            if connection not in busy:
                connection.connection.loseConnection()
        if not busy:
            return
        self.log.info("Waiting for {count} outstanding requests to complete...",
                      count=len(busy))
        everything = gatherResults([connection.when_closed() for connection in busy])

        def force() -> None:
            self.log.info("Timeout reached, exiting (forced)")
            for connection in busy:
                connection.abandon()

        timer = clock.callLater(grace, force)
        try:
            await everything
        finally:
            if timer.active():
                timer.cancel()
