"""Stopping on SIGTERM or SIGINT the way stap-serverd 4.8 does.

twistd re-raises the signal that stopped it once the services are down,
so the process would die by SIGTERM.  4.8 logs ``Received signal N,
exiting`` and exits 0 after finishing its requests, and init scripts and
the manager expect that; this service, first in the tree and so stopped
last, makes it so.
"""

from __future__ import annotations

import signal

from twisted.application.service import Service
from twisted.logger import Logger

_CLEAN = (signal.SIGTERM, signal.SIGINT)


class CleanExitOnSignal(Service):
    log = Logger(namespace="stapsrv")

    def __init__(self, reactor: object) -> None:
        # ``_exitSignal`` is twistd's record, on the reactor, of the signal
        # that stopped it (``twisted.internet.base.ReactorBase``); no
        # interface has it.
        self._reactor = reactor

    def stopService(self) -> None:
        Service.stopService(self)
        number = getattr(self._reactor, "_exitSignal", None)
        if number in _CLEAN:
            self.log.info("Received signal {number}, exiting", number=int(number))
            setattr(self._reactor, "_exitSignal", None)
