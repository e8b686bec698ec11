"""Stopping on SIGTERM or SIGINT the way stap-serverd 4.8 does.

twistd re-raises the signal that stopped it once the services are down,
so the process would die by SIGTERM.  4.8 logs ``Received signal N,
exiting`` and exits 0 after finishing its requests, and init scripts and
the manager expect that; this service, first in the tree and so stopped
last, makes it so.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

_CLEAN = (signal.SIGTERM, signal.SIGINT)


class CleanExitOnSignal(Service):
    log = Logger(namespace="stapsrv")

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor

    def stopService(self) -> None:
        super().stopService()
        number = getattr(self._reactor, "_exitSignal", None)
        if number in _CLEAN:
            self.log.info("Received signal {number}, exiting", number=int(number))
            self._reactor._exitSignal = None
