"""Which connections to close so that new clients still get in.

Each connection costs the server a descriptor.  A peer that opens
connections and sends nothing (or stalls mid-request) would otherwise take
them all, and the server would refuse everybody else (EMFILE) until its
request timeout cut the idle ones off.  This policy keeps room instead:

- no peer address holds more than ``per_peer`` connections at once
  (behind HAProxy, the address its PROXY header names);
- when fewer than ``reserve`` descriptors are free, connections that have
  not completed a request are closed, enough to free ``reserve`` more (so
  one shortage closes a batch, not one per new connection): first those of
  the peers holding the most such connections, and among a peer's, the
  ones accepted first (not the ones that sent a byte last: a client
  dripping one byte at a time must not look newer than an honest one in
  its TLS handshake);
- a connection accepted less than ``grace`` seconds ago is never closed
  this way (the new connection least of all): if there are too few older
  ones to close, the reserve shrinks, and below a quarter of it;
- when fewer than a quarter of ``reserve`` are free even so (counting
  those being closed as free: they are released an instant later), a new
  connection is closed at once: the last descriptors are the server's own
  (its files, the translators' pipes).

Sans-IO: counts and times in, decisions out.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Iterable

from attrs import frozen

#: Descriptors kept free for new clients when none is configured.
DEFAULT_RESERVE = 128

#: The per-peer cap, when none is configured, is the descriptor limit
#: divided by this...
PEER_SHARE = 8

#: ... but never more than this.
PEER_CEILING = 1024

#: Seconds after its accept during which a connection is never closed to
#: make room (its TLS handshake and upload are under way).
GRACE = 2.0


def default_per_peer(limit: int) -> int:
    """The per-peer cap for a descriptor ``limit``: an eighth of it, at
    most ``PEER_CEILING``."""
    return max(1, min(limit // PEER_SHARE, PEER_CEILING))


def effective_reserve(reserve: int, limit: int) -> int:
    """``reserve``, but never more than a quarter of ``limit`` (a small
    limit must still leave most descriptors to the connections)."""
    return max(1, min(reserve, limit // 4))


@frozen
class Waiting:
    """A connection that has not completed a request: ``accepted`` is when
    it was accepted, ``peer`` the address it counts under (None: not known
    yet)."""

    key: Hashable
    accepted: float
    peer: Hashable | None = None


@frozen
class AdmissionPolicy:
    """The limits: ``limit`` descriptors for the whole process, ``reserve``
    of them kept free, at most ``per_peer`` connections from one address
    (0: no cap)."""

    limit: int
    reserve: int = DEFAULT_RESERVE
    per_peer: int = 0

    @property
    def kept_free(self) -> int:
        return effective_reserve(self.reserve, self.limit)

    @property
    def floor(self) -> int:
        """Free descriptors below which new connections are closed at once."""
        return max(1, self.kept_free // 4)

    def peer_admits(self, held: int) -> bool:
        """A new connection from a peer already holding ``held`` may stay."""
        return self.per_peer <= 0 or held < self.per_peer

    def admits(self, in_use: int) -> bool:
        """A new connection may be kept with ``in_use`` descriptors in use
        (its own included)."""
        return self.limit - in_use >= self.floor

    def short(self, in_use: int) -> bool:
        """Fewer than ``reserve`` descriptors are free."""
        return self.limit - in_use < self.kept_free

    def to_close(self, in_use: int, waiting: Iterable[Waiting], now: float = float("inf"),
                 grace: float = 0.0) -> list[Hashable]:
        """The keys of the connections to close with ``in_use`` descriptors
        in use (those being closed not counted): none while at least
        ``reserve`` are free, else as many as free ``reserve`` more (fewer
        if fewer may go), among those accepted at least ``grace`` seconds
        before ``now``: the busiest peers' first, the first accepted first."""
        if not self.short(in_use):
            return []
        free = self.limit - in_use
        wanted = 2 * self.kept_free - free
        entries = list(waiting)
        held = Counter(entry.peer for entry in entries if entry.peer is not None)
        eligible = (entry for entry in entries if now - entry.accepted >= grace)
        chosen = heapq.nsmallest(
            wanted, eligible,
            key=lambda entry: (-(held[entry.peer] if entry.peer is not None else 1),
                               entry.accepted))
        return [entry.key for entry in chosen]
