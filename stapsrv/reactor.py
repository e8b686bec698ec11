"""The reactor a server runs on: one value, chosen by the entry point
(``makeService``, the quick start) and passed down to every part.

Importing ``twisted.internet.reactor`` installs the default reactor, so it
happens here, in a function the entry points call, never when a module is
imported: twistd must have installed the reactor it was asked for first.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)


class IHandlerReactor(IReactorTime, IReactorProcess, IReactorFromThreads):
    """What a request handler asks of its reactor: timers, the translator
    process, and answers from its thread pool."""


class IServerReactor(IHandlerReactor, IReactorCore, IReactorTCP, IReactorUNIX, IReactorThreads):
    """What a compile server asks of its reactor: listening, the system bus,
    timers, child processes and threads.  Every reactor twistd offers on Linux has it all."""


def installed_reactor() -> IServerReactor:
    """The reactor twistd (or the default) installed."""
    from twisted.internet import reactor

    # The module is replaced by the reactor object when it is installed.
    return cast(IServerReactor, reactor)
