"""The server log (stapsrv.app.logs): the file service's start and stop, and
SIGHUP reopening the files and leaving the previous handler in place."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from stapsrv.app.logs import LogFileService, LoggedTree, ReopenOnSighup, format_line


class ImmediateReactor(Clock):
    """``callFromThread`` runs at once (the signal arrives on this thread)."""

    def callFromThread(self, function: Callable[..., object], *args: object,
                       **kwargs: object) -> None:
        function(*args, **kwargs)


class LogFileServiceTests(TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.publisher = LogPublisher()
        self.log = Logger(namespace="stapsrv", observer=self.publisher)

    def test_lines_go_to_the_file_while_running(self) -> None:
        service = LogFileService(self.path, self.publisher)
        service.startService()
        self.log.info("Using network address [{address}]:{port}", address="::", port=1)
        service.stopService()
        self.assertRegex(self.path.read_text(), r"^\w{3} .*: Using network address \[::\]:1\n$")

    def test_stop_removes_the_observer_and_closes_the_file(self) -> None:
        service = LogFileService(self.path, self.publisher)
        service.startService()
        stream = service._stream
        assert stream is not None
        service.stopService()
        self.assertTrue(stream.closed)
        self.log.info("after the stop")
        self.assertNotIn("after the stop", self.path.read_text())
        self.assertEqual(self.publisher._observers, [])

    def test_reopen_after_rotation(self) -> None:
        service = LogFileService(self.path, self.publisher)
        service.startService()
        self.addCleanup(service.stopService)
        self.log.info("before")
        rotated = self.path.with_name("rotated")
        os.rename(self.path, rotated)
        service.reopen()
        self.log.info("after")
        self.assertIn("before", rotated.read_text())
        self.assertNotIn("after", rotated.read_text())
        self.assertIn("after", self.path.read_text())


class ReopenOnSighupTests(TestCase):
    def setUp(self) -> None:
        self.original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.original)

    def test_stop_without_start(self) -> None:
        ReopenOnSighup([], ImmediateReactor()).stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)

    def test_sighup_reopens_and_stop_restores_the_previous_handler(self) -> None:
        calls: list[int] = []

        def previous(signum: int, frame: FrameType | None) -> None:
            calls.append(signum)

        signal.signal(signal.SIGHUP, previous)
        path = Path(self.mktemp())
        publisher = LogPublisher()
        log = Logger(namespace="stapsrv", observer=publisher)
        service = LogFileService(path, publisher)
        service.startService()
        self.addCleanup(service.stopService)
        reopen = ReopenOnSighup([service], ImmediateReactor())
        reopen.startService()
        os.rename(path, path.with_name("rotated"))
        os.kill(os.getpid(), signal.SIGHUP)
        log.info("after the signal")
        self.assertIn("after the signal", path.read_text())
        self.assertEqual(calls, [])
        reopen.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


class DrainingServer(Service):
    """Logs one line when it stops, once the test lets its drain end."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self.drained: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        def finished(_: None) -> None:
            self.log.info("Waiting for 1 outstanding requests to complete...")
        return self.drained.addCallback(finished)


class LoggedTreeTests(TestCase):
    def test_the_log_outlives_the_servers_stop(self) -> None:
        path = Path(self.mktemp())
        publisher = LogPublisher()
        log = Logger(namespace="stapsrv", observer=publisher)
        tree = LoggedTree()
        log_service = LogFileService(path, publisher)
        tree.add_log(log_service)
        tree.add_log(ReopenOnSighup([log_service], ImmediateReactor()))
        server = DrainingServer(log)
        server.setServiceParent(tree)
        self.assertIs(list(tree)[0], log_service, "started first")
        tree.startService()
        stopped = tree.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(log_service.running, "the log waits for the server")
        server.drained.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(log_service.running)
        self.assertIn("Waiting for 1 outstanding requests to complete...", path.read_text())



class ControlCharacterTests(TestCase):
    def test_a_newline_in_a_field_cannot_make_a_second_line(self) -> None:
        event = {"log_namespace": "stapsrv", "log_time": 0.0, "log_level": None,
                 "log_format": "Options passed from the client: {arguments}",
                 "arguments": "-p4 \nThu Jan  1 00:00:00 1970: Request from x complete\x1b[0m"}
        line = format_line(event)
        assert line is not None
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.endswith("Options passed from the client: -p4 \\nThu Jan  1 "
                                      "00:00:00 1970: Request from x complete\\x1b[0m\n"))

    def test_a_failure_from_client_text_cannot_make_a_line_of_its_own(self) -> None:
        forged = "Thu Jan  1 00:00:00 1970: Request from x complete"
        try:
            raise ValueError(f"no such file: a\n{forged}\x1b[2J")
        except ValueError:
            failure = Failure()
        event = {"log_namespace": "stapsrv", "log_time": 0.0, "log_level": None,
                 "log_format": "Error processing client request from {peer}",
                 "peer": "127.0.0.1:1", "log_failure": failure}
        line = format_line(event)
        assert line is not None
        lines = line.rstrip("\n").split("\n")
        self.assertEqual(lines[1], "Traceback (most recent call last):")
        self.assertEqual(lines[-1], f"builtins.ValueError: no such file: a\\n{forged}\\x1b[2J")
        self.assertFalse([text for text in lines[1:] if text.startswith(forged)], lines)
        self.assertNotIn("\x1b", line)


class JournalObserverTests(TestCase):
    """twistd's own log (the journal), through ``--logger``: every event,
    client text escaped."""

    def test_client_text_cannot_forge_journal_lines(self) -> None:
        import io

        from stapsrv.app.logs import EscapedTextObserver, journal_observer

        stream = io.StringIO()
        publisher = LogPublisher()
        publisher.addObserver(EscapedTextObserver(stream))
        log = Logger(namespace="twisted.other", observer=publisher)
        log.info("Client said {text}", text="hi\nFri Dec  4 10:00:00 2026: forged\x1b[2J")
        try:
            raise ValueError("bad\nline")
        except ValueError:
            log.failure("Failed for {peer}", Failure(), peer="a\rb")
        lines = stream.getvalue().splitlines()
        self.assertIn("Client said hi\\nFri Dec  4 10:00:00 2026: forged\\x1b[2J", lines[0])
        self.assertIn("Failed for a\\rb", lines[1])
        self.assertTrue(all(line.startswith("\t") for line in lines[2:]), lines)
        self.assertIn("ValueError: bad\\nline", stream.getvalue())
        self.assertFalse(any("forged" in line for line in lines[1:]))
        self.assertIsInstance(journal_observer(), EscapedTextObserver)
