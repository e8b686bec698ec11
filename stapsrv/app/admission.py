"""Admission: room for new clients when descriptors run short.

The policy (:mod:`stapsrv.core.admission`) decides; this module feeds it
and carries its decisions out:

- :class:`Descriptors` knows the process's descriptor limit and how many
  are in use: a running estimate moved by the connections opened and
  closed, corrected from ``/proc/self/fd`` only when it comes near the
  limit, and then at most once a second (listing it takes a few
  microseconds per descriptor, on the reactor's thread: over a second at
  half a million);
- :class:`Admission` (one per process: descriptors are the process's, and
  one process may run several servers) holds every server's connections
  and closes waiting ones (accepted longest ago, the busiest peers'
  first, never one younger than its grace) when the reserve is gone;
- :class:`AdmissionFactory` sits under everything else on a listening
  port (under the PROXY reader too), so that a connection it refuses is
  closed at once, before TLS or any protocol is made for it;
- :class:`AdmissionReport` says what was closed in the server log, at
  most one line per interval with the counts since the last.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from stapsrv.app.logs import NAMESPACE
from stapsrv.app.wrapping import GateFactory
from stapsrv.core.admission import GRACE, AdmissionPolicy, Waiting

#: Seconds between two measures of the descriptors in use.
MEASURE_INTERVAL = 1.0

#: Descriptors in use are measured when fewer than this many are free by
#: the estimate (and :class:`Admission` asks for a few times its reserve).
NEAR = 512

#: Seconds between two log lines about closed connections.
REPORT_INTERVAL = 10.0

#: Why a connection was closed early, as the metrics label it.
OLDEST = "oldest"  # waited longest without a request while descriptors ran short
FULL = "full"  # new, and almost no descriptor was free
PEER = "peer"  # its peer address already held its share
REASONS = (OLDEST, FULL, PEER)


def open_descriptors() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Descriptors:
    """How many descriptors the process has, and uses: a running estimate
    (the first measure, moved by the connections opened and closed since),
    measured again only when fewer than ``near`` are free by it, and then
    at most once per ``interval``.  A measure that fails (``/proc/self/fd``
    cannot be opened when no descriptor is left) counts as the limit
    reached, until the next one succeeds."""

    def __init__(self, clock: IReactorTime, count: Callable[[], int] = open_descriptors,
                 limit: Callable[[], int] = descriptor_limit,
                 interval: float = MEASURE_INTERVAL, near: int = NEAR) -> None:
        self._clock = clock
        self._count = count
        self._limit = limit
        self._interval = interval
        self.near = near
        self._measured_at: float | None = None
        self._others = 0
        self._full = False
        self.connections = 0

    @property
    def limit(self) -> int:
        return self._limit()

    def opened(self) -> None:
        self.connections += 1

    def closed(self) -> None:
        self.connections -= 1

    def in_use(self) -> int:
        now = self._clock.seconds()
        limit = self.limit
        estimate = self._others + self.connections
        if self._measured_at is None or (
                (self._full or limit - estimate < self.near)
                and now - self._measured_at >= self._interval):
            self._measured_at = now
            try:
                measured = self._count()
            except OSError:
                self._full = True
            else:
                self._full = False
                self._others = max(0, measured - self.connections)
                estimate = self._others + self.connections
        return max(estimate, limit) if self._full else estimate


class Admitted(TypingProtocol):
    """A connection as admission sees it."""

    @property
    def waiting_since(self) -> float | None:
        """When it was accepted, if it has not completed a request."""

    @property
    def waiting_peer(self) -> str | None:
        """The address it counts under (None: not known yet)."""

    def evict(self) -> None:
        """Close it: its descriptor is needed for new clients."""


class AdmissionReport:
    """What admission closed, in the server log: the first closing at
    once, then at most one line per ``interval`` with the counts since."""

    log = Logger(namespace=NAMESPACE)

    def __init__(self, clock: IReactorTime, interval: float = REPORT_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._counts: Counter[str] = Counter()
        #: Addresses of the connections closed, by reason.
        self._peers: dict[str, Counter[str]] = {reason: Counter() for reason in REASONS}
        self._last: float | None = None
        self._pending: IDelayedCall | None = None
        self.in_use = 0
        self.limit = 0
        self.reserve = 0

    def closed(self, reason: str, peer: str | None = None) -> None:
        self._counts[reason] += 1
        if peer is not None:
            self._peers.setdefault(reason, Counter())[peer] += 1
        now = self._clock.seconds()
        if self._last is None or now - self._last >= self._interval:
            self.flush()
        elif self._pending is None:
            self._pending = self._clock.callLater(
                self._interval - (now - self._last), self.flush)

    def flush(self) -> None:
        """Log the counts since the last line (none: nothing to say)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if not self._counts:
            return
        self._last = self._clock.seconds()
        self.log.warn(
            "Closed connections to keep room for new clients: {oldest} waiting longest "
            "without a request{oldest_from}, {full} new ones with no descriptor to spare, "
            "{peer} over the per-peer cap{peer_from} ({in_use} of {limit} descriptors in use, "
            "{reserve} kept free; at most one such line every {interval:g} s)",
            oldest=self._counts[OLDEST], full=self._counts[FULL], peer=self._counts[PEER],
            oldest_from=self._busiest(OLDEST), peer_from=self._busiest(PEER),
            in_use=self.in_use, limit=self.limit, reserve=self.reserve,
            interval=self._interval)
        self._counts.clear()
        for peers in self._peers.values():
            peers.clear()

    def _busiest(self, reason: str) -> str:
        """The addresses most closed for ``reason``, in parentheses."""
        peers = self._peers.get(reason)
        if not peers:
            return ""
        return " (most from " + ", ".join(
            f"{peer} ({count})" for peer, count in peers.most_common(3)) + ")"


class Admission:
    """Every connection of the process's servers, and the reserve of
    descriptors kept for new ones.  A connection accepted less than
    ``grace`` seconds ago is never closed to make room."""

    def __init__(self, clock: IReactorTime, reserve: int,
                 descriptors: Descriptors | None = None,
                 report: AdmissionReport | None = None,
                 grace: float = GRACE) -> None:
        self.clock = clock
        self.reserve = reserve
        self.grace = grace
        self.descriptors = descriptors or Descriptors(clock)
        self.report = report or AdmissionReport(clock)
        self._connections: set[Admitted] = set()
        self._closing: set[Admitted] = set()
        #: No connection may be closed to make room before this time (a
        #: search found none; the youngest waiting come of age then).
        self._none_until: float | None = None
        self._retune()

    def _retune(self) -> None:
        """Measure descriptors when fewer than a few reserves are free."""
        self.descriptors.near = max(self.descriptors.near, 4 * self.policy().kept_free)

    def policy(self, per_peer: int = 0) -> AdmissionPolicy:
        return AdmissionPolicy(limit=self.descriptors.limit, reserve=self.reserve,
                               per_peer=per_peer)

    def has_room(self) -> bool:
        """A connection just accepted (its socket open, not yet counted)
        may stay: if not at first, once connections have been closed to
        make room (those being closed counted as free)."""
        policy = self.policy()
        if policy.admits(self.descriptors.in_use() + 1 - len(self._closing)):
            return True
        self.make_room()
        return policy.admits(self.descriptors.in_use() + 1 - len(self._closing))

    def opened(self, connection: Admitted) -> None:
        self._connections.add(connection)
        self.descriptors.opened()
        if self._none_until is not None and connection.waiting_since is not None:
            # It may be closed to make room once its grace is over.
            self._none_until = min(self._none_until, connection.waiting_since + self.grace)
        self.make_room(connection)

    def closed(self, connection: Admitted) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._closing.discard(connection)
            self.descriptors.closed()

    def make_room(self, new: Admitted | None = None) -> None:
        """Close waiting connections if the reserve is gone (never ``new``,
        nor any younger than the grace)."""
        policy = self.policy()
        in_use = self.descriptors.in_use() - len(self._closing)
        if not policy.short(in_use):
            return  # (the common case: no need to look at every connection)
        now = self.clock.seconds()
        if self._none_until is not None and now < self._none_until:
            return  # (none could go a moment ago, and none has come of age)
        candidates: dict[Hashable, Admitted] = {}  # by id()
        waiting = []
        youngest_due: float | None = None
        for connection in self._connections:
            since = connection.waiting_since
            if since is None or connection in self._closing or connection is new:
                continue
            candidates[id(connection)] = connection
            waiting.append(Waiting(id(connection), since, connection.waiting_peer))
            if now - since < self.grace:
                due = since + self.grace
                youngest_due = due if youngest_due is None else min(youngest_due, due)
        if new is not None and new.waiting_since is not None:
            due = new.waiting_since + self.grace
            youngest_due = due if youngest_due is None else min(youngest_due, due)
        chosen = policy.to_close(in_use, waiting, now, self.grace)
        if not chosen:
            self._none_until = youngest_due if youngest_due is not None else float("inf")
            return
        self._none_until = None
        self.report.in_use, self.report.limit = in_use + len(self._closing), policy.limit
        self.report.reserve = policy.kept_free
        for key in chosen:
            connection = candidates[key]
            self._closing.add(connection)
            connection.evict()

    def refused(self, reason: str, peer: str | None = None) -> None:
        """A connection was closed for ``reason`` before it was served."""
        policy = self.policy()
        self.report.in_use, self.report.limit = self.descriptors.in_use(), policy.limit
        self.report.reserve = policy.kept_free
        self.report.closed(reason, peer)


class AdmissionFactory(GateFactory):
    """Builds ``wrapped``'s protocols while descriptors are left (and, when
    ``peer_admits`` is given, while the peer is under its cap); for a
    connection it refuses, it builds none, so the port closes it at once."""

    def __init__(self, wrapped: IProtocolFactory, admission: Admission,
                 refused: Callable[[str, str | None], None],
                 peer_admits: Callable[[IAddress], bool] | None = None,
                 describe: Callable[[IAddress], str] = str) -> None:
        super().__init__(wrapped)
        self.admission = admission
        self.refused = refused
        self.peer_admits = peer_admits
        self.describe = describe

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self.admission.has_room():
            self.refused(FULL, None)
            return None
        if self.peer_admits is not None and not self.peer_admits(addr):
            self.refused(PEER, self.describe(addr))
            return None
        return self.wrapped.buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class AdmissionEndpoint:
    """``endpoint``, its connections admitted by an :class:`AdmissionFactory`."""

    def __init__(self, endpoint: IStreamServerEndpoint,
                 gate: Callable[[IProtocolFactory], AdmissionFactory]) -> None:
        self.endpoint = endpoint
        self.gate = gate

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        result: Deferred[IListeningPort] = self.endpoint.listen(self.gate(protocolFactory))
        return result
