"""Connections the server could not accept, in the server log.

When accept(2) fails (EMFILE under a connection flood: the process is out
of descriptors; ENFILE, ENOBUFS, ENOMEM), Twisted's listening port logs it
in its own namespace, which only twistd's log shows, and closes the
connections it cannot take.  This service turns those events into server
log lines, at most one per ``interval`` seconds (a flood makes thousands),
each saying how many came since the line before.  The line names no
server: the descriptors are the whole process's.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

from stapsrv.app.logs import NAMESPACE

#: What twisted.internet.tcp's accept loop logs (Twisted 22 and later).
_PORT_NAMESPACE = "twisted.internet.tcp.Port"
_EMFILE_FORMAT = "EMFILE encountered; releasing reserved file descriptor."
_ERROR_FORMAT = "Could not accept new connection ({acceptError})"
_CLOSED_FORMAT = "EMFILE recovery: Closed socket from {address}"

#: Seconds between two lines about refused connections.
DEFAULT_INTERVAL = 10.0


class AcceptErrorLog(Service):
    """While running, reports accept failures in the server log."""

    def __init__(self, clock: IReactorTime, interval: float = DEFAULT_INTERVAL,
                 publisher: LogPublisher = globalLogPublisher) -> None:
        self.observer = AcceptErrorObserver(clock, interval)
        self._publisher = publisher

    def startService(self) -> None:
        self._publisher.addObserver(self.observer)
        Service.startService(self)

    def stopService(self) -> None:
        Service.stopService(self)
        self._publisher.removeObserver(self.observer)


@implementer(ILogObserver)
class AcceptErrorObserver:
    """Turns Twisted's accept-error events into server log lines, at most
    one per ``interval`` seconds."""

    log = Logger(namespace=NAMESPACE)

    def __init__(self, clock: IReactorTime, interval: float = DEFAULT_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: float | None = None
        self._errors = 0
        self._closed = 0

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") != _PORT_NAMESPACE:
            return
        text = event.get("log_format")
        if text == _CLOSED_FORMAT:
            self._closed += 1
            return
        if text == _EMFILE_FORMAT:
            error = "EMFILE"
        elif text == _ERROR_FORMAT and event.get("acceptError") != "ECONNABORTED":
            # (ECONNABORTED: a client gave up before it was accepted.)
            error = str(event.get("acceptError", "?"))
        else:
            return
        self._errors += 1
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        self.log.error(
            "Cannot accept connections: {error} ({meaning}); {count} time(s) and "
            "{closed} connection(s) closed unanswered since the last such line "
            "(at most one every {interval:g} s)",
            error=error, meaning=_MEANINGS.get(error, "accept failed"), count=self._errors,
            closed=self._closed, interval=self._interval)
        self._errors = 0
        self._closed = 0


_MEANINGS = {
    "EMFILE": "the server is out of file descriptors, see its open files limit",
    "ENFILE": "the system is out of file descriptors",
    "ENOBUFS": "out of socket buffers",
    "ENOMEM": "out of memory",
}
