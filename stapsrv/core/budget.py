"""What one client address may make others wait for (sans-IO).

Two pieces, both counts in and decisions out:

- :class:`FairSlots`: a fixed number of slots (translator slots, or the
  fetches the kernel store runs at once) shared by client addresses.  A
  free slot goes to the waiting address that holds the fewest slots now,
  and among those to the one that has waited longest since it was last
  served: one client's many requests do not push another client's single
  request to the back of the queue.
- :class:`PeerBudget`: the kernel store work (a release fetch, a
  System.map pass, a -dbg download, a module debuginfo pass, a warm-up)
  each address may have under way at once; past it, a request is refused
  with :func:`over_budget_message`.

:func:`peer_address` is the address part of a peer as the server logs it
(``10.0.0.1:40000``, ``[2001:db8::1]:40000``): the budget is per address,
not per connection.  An IPv6 client counts by its /64 (:func:`share_key`):
one host has a whole /64 to pick source addresses from, and would otherwise
have as many shares as it likes.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Iterator
from typing import Generic, TypeVar

from attrs import define, field

T = TypeVar("T")

#: The key of the server's own work (warm-ups at start, the admin's tools).
SERVER = ""


#: The IPv6 prefix one client counts as (a host's own subnet).
IPV6_SHARE_PREFIX = 64


def peer_address(peer: str) -> str:
    """The share key (:func:`share_key`) of ``host`` in ``host:port`` or
    ``[host]:port``; anything else as it is."""
    if peer.startswith("["):
        host, bracket, _ = peer[1:].partition("]")
        return share_key(host) if bracket else peer
    host, colon, port = peer.rpartition(":")
    return share_key(host) if colon and port.isdigit() and ":" not in host else peer


def share_key(host: str) -> str:
    """What a client address counts as for its shares: an IPv4 address as
    it is (also one seen through an IPv6 socket), an IPv6 address as its
    /64 (``2001:db8:1:2::/64``) except a link-local one (as it is, zone
    included), anything else as it is."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.is_link_local:
        return host  # every link's fe80::/64: the address (and zone) tells hosts apart
    return str(ipaddress.IPv6Network((address, IPV6_SHARE_PREFIX), strict=False))


@define(eq=False)
class FairSlots(Generic[T]):
    """``limit`` slots shared fairly among keys (client addresses)."""

    limit: int
    #: Slots held now, by key.
    held: Counter[str] = field(init=False, factory=Counter)
    #: Waiters by key, each key's first come first; the keys in the order
    #: their turn comes when they hold as many slots as each other.
    _queues: dict[str, deque[T]] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("FairSlots needs at least one slot")

    @property
    def in_use(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int:
        return self.limit - self.in_use

    def __len__(self) -> int:
        """Waiters, all keys together."""
        return sum(len(queue) for queue in self._queues.values())

    def waiters(self) -> Iterator[tuple[str, T]]:
        for key, queue in self._queues.items():
            for item in queue:
                yield key, item

    def request(self, key: str, item: T) -> bool:
        """``item`` (for ``key``) takes a slot now (True) or waits for one."""
        if self.free > 0 and not self._queues:
            self.held[key] += 1
            return True
        self._queues.setdefault(key, deque()).append(item)
        return False

    def withdraw(self, item: T) -> bool:
        """``item`` no longer waits (its client went away); False if it was
        not waiting."""
        for key, queue in self._queues.items():
            if item in queue:
                queue.remove(item)
                if not queue:
                    del self._queues[key]
                return True
        return False

    def release(self, key: str) -> tuple[str, T] | None:
        """``key`` gives its slot back; the waiter that gets it (its key has
        taken the slot already), or None."""
        if self.held[key] <= 0:
            raise ValueError(f"{key!r} holds no slot")
        self.held[key] -= 1
        if self.held[key] == 0:
            del self.held[key]
        return self.next_waiter()

    def next_waiter(self) -> tuple[str, T] | None:
        """The waiter that takes a free slot now (None: none, or no slot)."""
        if self.free <= 0 or not self._queues:
            return None
        # The first of the fewest: dicts keep the keys in turn order.
        key = min(self._queues, key=lambda waiting: self.held[waiting])
        queue = self._queues.pop(key)
        item = queue.popleft()
        if queue:
            self._queues[key] = queue  # to the back of the turn order
        self.held[key] += 1
        return key, item


class OverBudget(Exception):
    """The client's address has as much kernel store work under way as it
    may have; the message is its ``Server:`` line."""


@define(eq=False)
class Work:
    """Kernel store work under way for one address."""

    address: str
    #: The kernel release it is for.
    release: str
    #: What it is, for the client: ``the fetch of kernel release '6.1.0-7-amd64'``.
    what: str


@define(eq=False)
class PeerBudget:
    """Kernel store work under way for at most ``per_peer`` kernel releases
    at once for one client address (0: no cap): more work for a release
    already among them costs nothing more (two requests for the same new
    release, its fetch, symbols and warm-up).  The server's own work is
    never capped."""

    per_peer: int
    _under_way: list[Work] = field(init=False, factory=list)

    def under_way(self, address: str) -> list[Work]:
        return [work for work in self._under_way if work.address == address]

    def allows(self, address: str, release: str) -> bool:
        """Whether :meth:`start` would count work for ``release``."""
        releases = {work.release for work in self.under_way(address)}
        return (address == SERVER or release in releases
                or not 0 < self.per_peer <= len(releases))

    def start(self, address: str, release: str, what: str) -> Work | None:
        """The work, counted against ``address``; None when the address has
        work under way for as many other releases as it may have."""
        if not self.allows(address, release):
            return None
        work = Work(address, release, what)
        self._under_way.append(work)
        return work

    def finish(self, work: Work) -> None:
        self._under_way.remove(work)


def over_budget_message(asked: str, address: str, per_peer: int,
                        under_way: list[Work]) -> str:
    """The client's ``Server:`` line: what it asked, what it may have, when
    to try again."""
    releases = "one kernel release" if per_peer == 1 else f"{per_peer} kernel releases"
    busy = ", ".join(dict.fromkeys(work.what for work in under_way)) or "other work"
    return (f"Server: Not starting {asked} for {address} now: this server does kernel store "
            f"work (fetching a release, its symbols or debuginfo, its modules' debuginfo, a "
            f"warm-up compile) for at most {releases} at a time for one client address "
            f"(--peer-fetches), and {address} has {busy} under way.  Try again once that "
            f"is done.")
