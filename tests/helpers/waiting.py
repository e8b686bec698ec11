"""Waiting for the event a test means, with a net (never a measure of
speed): async for tests on the reactor, blocking for threads and
synchronous tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

T = TypeVar("T")

#: How long a test waits for an event before it gives up: a net for a test
#: gone wrong, never a measure of how fast anything is.
NET = 60.0


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """``predicate()`` once it is true, or its last (false) value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        await pause(interval)


def wait_until(predicate: Callable[[], object], net: float = NET, interval: float = 0.05) -> bool:
    """Block until ``predicate()`` is true; False if it is still false after
    ``net`` seconds (a net for a test gone wrong, never a measure of speed)."""
    deadline = time.monotonic() + net
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def is_dead(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
