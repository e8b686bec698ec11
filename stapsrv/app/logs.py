"""The server log in 4.8's format: ``<ctime>: <message>`` per line.

The upstream testsuite and admins grep this file (``Using network
address``, ``Processing 6 concurrent requests...``), so its lines keep the
exact 4.8 wording; the events behind them keep their fields for any other
observer (twistd's own log, JSON).  A line never holds a control character
(:mod:`stapsrv.core.logtext`), so client text cannot forge lines.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Union

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python import reflect
from zope.interface import implementer

from stapsrv.core.logtext import escape_controls, escape_traceback

NAMESPACE = "stapsrv"
_log = Logger(namespace=NAMESPACE)

#: What ``signal.signal`` returns and accepts.
_SignalHandler = Union[Callable[[int, FrameType | None], object], int, signal.Handlers, None]


def escaped_text(event: LogEvent) -> str:
    """An event's text with every control character escaped, its
    traceback (if any) escaped too, its lines indented."""
    text = escape_controls(formatEvent(event))
    failure = event.get("log_failure")
    if failure is not None:
        message = f"{reflect.qual(failure.type)}: {reflect.safe_str(failure.value)}"
        text += "\n" + escape_traceback(failure.getTraceback(), message)
    return text.rstrip()


def format_line(event: LogEvent, namespaces: frozenset[str] | None = None) -> str | None:
    """The log line for a stapsrv event, or None for other events.

    With ``namespaces``, only events of those servers (and unattributed
    stapsrv events) are taken: one process may run several servers.
    """
    namespace = event.get("log_namespace", "")
    if namespace != NAMESPACE and not namespace.startswith(NAMESPACE + "."):
        return None
    if namespaces is not None and namespace != NAMESPACE and namespace not in namespaces:
        return None
    # One event, one line: a newline or escape sequence that came from a
    # client (in any field) is shown escaped; only a traceback spans lines,
    # escaped as well, its lines indented.
    stamp = time.ctime(event.get("log_time", time.time()))
    return f"{stamp}: {escaped_text(event)}\n"


@implementer(ILogObserver)
class EscapedTextObserver:
    """twistd's own log (every event, twistd's classic format) with each
    event's text escaped as in :func:`format_line`: for the journal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        shown = {key: value for key, value in event.items()
                 if key not in ("log_format", "log_failure", "log_text", "log_io")}
        shown["log_format"] = "{log_escaped}"
        shown["log_escaped"] = escaped_text(event)
        line = formatEventAsClassicLogText(shown)
        if line is not None:
            self.stream.write(line)
            self.stream.flush()


def journal_observer() -> ILogObserver:
    """``twistd --logger=stapsrv.app.logs.journal_observer``: twistd's own
    log on standard output (the journal, under systemd), client text
    escaped."""
    return EscapedTextObserver(sys.stdout)


@implementer(ILogObserver)
class CtimeLogObserver:
    """Writes stapsrv events to a text stream in 4.8's format."""

    def __init__(self, stream: IO[str], namespaces: frozenset[str] | None = None) -> None:
        self.stream = stream
        self.namespaces = namespaces

    def __call__(self, event: LogEvent) -> None:
        line = format_line(event, self.namespaces)
        if line is not None:
            self.stream.write(line)
            self.stream.flush()


class LogFileService(Service):
    """Appends the server's events to ``--log FILE`` while running."""

    def __init__(self, path: Path, publisher: LogPublisher = globalLogPublisher,
                 namespaces: frozenset[str] | None = None) -> None:
        self.path = path
        self.namespaces = namespaces
        self._publisher = publisher
        self._stream: IO[str] | None = None
        self._observer: CtimeLogObserver | None = None

    def startService(self) -> None:
        self._stream = open(self.path, "a", encoding="utf-8", errors="replace")
        self._observer = CtimeLogObserver(self._stream, self.namespaces)
        self._publisher.addObserver(self._observer)
        Service.startService(self)

    def reopen(self) -> None:
        """Start a new file at the same path (after logrotate moved the old one)."""
        if self._observer is None:
            return
        try:
            stream = open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError as exc:
            _log.error("Cannot reopen the log file {path}: {error}; still writing the old one",
                       path=self.path, error=exc.strerror)
            return
        old, self._stream = self._stream, stream
        self._observer.stream = stream
        if old is not None:
            old.close()
        _log.info("Reopened the log file {path}", path=self.path)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._observer is not None:
            self._publisher.removeObserver(self._observer)
            self._observer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class ReopenOnSighup(Service):
    """SIGHUP reopens the logs (4.8 exits on SIGHUP; logrotate wants a reopen).

    Started before the servers, so the handler is in place by the time a
    server says it listens; stopping puts the previous handler back."""

    def __init__(self, services: Sequence[LogFileService], reactor: IReactorFromThreads) -> None:
        self._services = services
        self._reactor = reactor
        self._previous: _SignalHandler = None

    def _reopen_all(self) -> None:
        for service in self._services:
            service.reopen()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._reopen_all)

    def startService(self) -> None:
        self._previous = signal.signal(signal.SIGHUP, self._handler)
        Service.startService(self)

    def stopService(self) -> None:
        Service.stopService(self)
        if signal.getsignal(signal.SIGHUP) == self._handler:
            # None: the handler was not set from Python; the default it is.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGHUP, previous)


class LoggedTree(MultiService):
    """A service tree whose log services stop only once everything else
    has: ``MultiService`` stops all its children at once, and a server's
    last lines (the requests it lets finish) must still reach its file.
    The other children stop at once, as in ``MultiService``."""

    def __init__(self) -> None:
        MultiService.__init__(self)
        self._last: list[IService] = []

    def add_log(self, service: LogFileService | ReopenOnSighup) -> None:
        """Add ``service`` as a child that stops after the others."""
        Service.setServiceParent(service, self)
        self._last.append(service)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        others = [service for service in reversed(list(self)) if service not in self._last]
        await DeferredList([maybeDeferred(service.stopService) for service in others])
        for service in reversed(self._last):
            await maybeDeferred(service.stopService)
