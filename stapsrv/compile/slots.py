"""Slots taken in turn by client address: :class:`~stapsrv.core.budget.FairSlots`
under Twisted's :class:`~twisted.internet.defer.DeferredSemaphore` interface.

``acquire_for(address)`` waits for a slot in that address's turn and
``release_for(address)`` gives it back; plain ``acquire`` and ``release``
are the server's own work.  ``waiting`` and ``tokens`` read as a
semaphore's do (the factory counts the requests waiting for a slot).
"""

from __future__ import annotations

from collections import deque
from typing import Self

from twisted.internet.defer import Deferred, DeferredSemaphore

from stapsrv.core.budget import SERVER, FairSlots


class FairGate(DeferredSemaphore):
    """A semaphore whose free slots go to client addresses in turn."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.slots: FairSlots[Deferred[Self]] = FairSlots(tokens)
        self._releases: deque[str] = deque()
        self._releasing = False

    def acquire(self) -> Deferred[Self]:
        return self.acquire_for(SERVER)

    def release(self) -> None:
        self.release_for(SERVER)

    def acquire_for(self, address: str) -> Deferred[Self]:
        """Fires (with the gate) once ``address`` has a slot."""
        waiter: Deferred[Self] = Deferred(canceller=self._withdraw)
        if self.slots.request(address, waiter):
            self._sync()
            waiter.callback(self)
        else:
            self.waiting.append(waiter)
            self._sync()
        return waiter

    def release_for(self: Self, address: str) -> None:
        """Give ``address``'s slot back; the next turn's waiter fires.  A
        waiter that gives its slot back at once (a request whose client
        left) does so in a loop here, not by recursion: a long queue of
        those would otherwise hit the recursion limit half-way and lose
        the slot for good."""
        self._releases.append(address)
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._releases:
                turn = self.slots.release(self._releases.popleft())
                if turn is not None:
                    self.waiting.remove(turn[1])
                self._sync()
                if turn is not None:
                    turn[1].callback(self)
        finally:
            self._releasing = False

    def _withdraw(self, waiter: Deferred[Self]) -> None:
        if self.slots.withdraw(waiter):
            self.waiting.remove(waiter)
        self._sync()

    def _sync(self) -> None:
        self.tokens = self.slots.free
