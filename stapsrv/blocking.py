"""Blocking work off the reactor thread, typed: a component's
:class:`Blocking` runs a function in its thread pool and gives a
``Deferred`` of exactly what the function returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")


@frozen
class Blocking:
    """Where one component's blocking work runs."""

    reactor: IReactorFromThreads
    pool: ThreadPool

    def __call__(self, function: Callable[P, T], /, *args: P.args,
                 **kwargs: P.kwargs) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, function, *args, **kwargs)
