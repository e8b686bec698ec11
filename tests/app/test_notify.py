"""sd_notify: what systemd receives on its notification socket."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.app.notify import SystemdNotifier, message, socket_address


class AddressTests(TestCase):
    def test_paths_abstract_and_absent(self) -> None:
        self.assertEqual(socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}),
                         "/run/systemd/notify")
        self.assertEqual(socket_address({"NOTIFY_SOCKET": "@abstract"}), "\0abstract")
        self.assertIsNone(socket_address({}))
        self.assertIsNone(socket_address({"NOTIFY_SOCKET": "relative"}))

    def test_message(self) -> None:
        self.assertEqual(message(ready="1", status="Serving"), b"READY=1\nSTATUS=Serving")
        self.assertRaises(ValueError, message, status="two\nlines")


class NotifierTests(TestCase):
    def listen(self) -> tuple[socket.socket, str]:
        # An absolute path short enough for AF_UNIX (trial's are not).
        directory = Path(tempfile.mkdtemp(prefix="stapsrv-notify-"))
        self.addCleanup(shutil.rmtree, directory)
        path = directory / "notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(str(path))
        sock.settimeout(5)
        return sock, str(path)

    def test_ready_on_start_stopping_on_stop(self) -> None:
        sock, path = self.listen()
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
        notifier.startService()
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=Serving")
        notifier.stopService()
        self.assertEqual(sock.recv(4096).split(b"\n")[0], b"STOPPING=1")

    def test_outside_systemd_nothing_is_sent(self) -> None:
        notifier = SystemdNotifier({})
        notifier.startService()
        notifier.stopService()
        self.assertFalse(notifier.running)

    def test_gone_socket_is_not_fatal(self) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
        notifier.startService()
        self.assertTrue(notifier.running)
        self.flushLoggedErrors()
