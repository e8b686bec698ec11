"""A private D-Bus system bus with avahi-daemon on it, for publishing tests.

Never the global system bus: ``/run/dbus/system_bus_socket`` would make
apt's PackageKit hook start packagekitd.  The bus listens on a socket in a
temporary directory; avahi-daemon runs on it with ``allow-interfaces=lo``
and no wide-area DNS, so nothing leaves the host.  Everything a test needs
gets ``DBUS_SYSTEM_BUS_ADDRESS`` from :attr:`PrivateBus.environment`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import require_program

SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
AVAHI_CONF = Path("/etc/avahi/avahi-daemon.conf")


def bus_config(text: str, socket: Path) -> str:
    """``system.conf`` listening on ``socket``: no pidfile, no activation."""
    text = re.sub(r"<listen>[^<]*</listen>", f"<listen>unix:path={socket}</listen>", text)
    text = re.sub(r"\s*<pidfile>[^<]*</pidfile>", "", text)
    text = re.sub(r"\s*<standard_system_servicedirs\s*/>", "", text)
    text = re.sub(r"\s*<servicehelper>[^<]*</servicehelper>", "", text)
    text = text.replace("<includedir>system.d</includedir>",
                        f"<includedir>{SYSTEM_CONF.parent / 'system.d'}</includedir>")
    return text


def avahi_config(text: str) -> str:
    """avahi-daemon.conf restricted to loopback, without wide-area DNS."""
    lines = []
    for line in text.splitlines():
        key = line.lstrip("#").split("=", 1)[0].strip()
        if key in ("allow-interfaces", "deny-interfaces", "enable-wide-area"):
            continue
        lines.append(line)
        if line.strip() == "[server]":
            lines.append("allow-interfaces=lo")
        elif line.strip() == "[wide-area]":
            lines.append("enable-wide-area=no")
    return "\n".join(lines) + "\n"


class PrivateBus:
    """dbus-daemon (and optionally avahi-daemon) in a temporary directory."""

    def __init__(self) -> None:
        self.dbus_daemon = require_program("dbus-daemon")
        self.avahi_daemon = require_program("avahi-daemon")
        self.dbus_send = require_program("dbus-send")
        self.root = Path(tempfile.mkdtemp(prefix="stapsrv-bus-"))
        # The servers run as another user: they must reach the socket.
        self.root.chmod(0o755)
        self.socket = self.root / "system_bus_socket"
        self.dbus_pid: int | None = None
        self.avahi: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def environment(self) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def start(self, avahi: bool = True) -> PrivateBus:
        config = self.root / "system.conf"
        config.write_text(bus_config(SYSTEM_CONF.read_text(), self.socket))
        output = subprocess.run(
            [self.dbus_daemon, f"--config-file={config}", "--fork", "--print-pid"],
            check=True, capture_output=True, text=True, timeout=30).stdout
        self.dbus_pid = int(output.split()[0])
        self._wait(self.socket.exists, "the private bus socket")
        if avahi:
            self.start_avahi()
        return self

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.environment}

    def start_avahi(self) -> None:
        config = self.root / "avahi-daemon.conf"
        config.write_text(avahi_config(AVAHI_CONF.read_text()))
        log = open(self.root / "avahi.log", "ab")
        with log:
            self.avahi = subprocess.Popen(
                [self.avahi_daemon, "-f", str(config), "--no-rlimits"],
                env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        self._wait(self.avahi_running, "avahi-daemon on the private bus")

    def avahi_running(self) -> bool:
        if self.avahi is None or self.avahi.poll() is not None:
            raise AssertionError(f"avahi-daemon exited:\n{self.avahi_log()}")
        result = subprocess.run(
            [self.dbus_send, "--system", "--print-reply", "--dest=org.freedesktop.Avahi",
             "/", "org.freedesktop.Avahi.Server.GetState"],
            env=self._env(), capture_output=True, text=True, timeout=10)
        return result.returncode == 0 and "int32 2" in result.stdout

    def avahi_log(self) -> str:
        try:
            return (self.root / "avahi.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_avahi(self) -> None:
        if self.avahi is not None:
            if self.avahi.poll() is None:
                self.avahi.send_signal(signal.SIGTERM)
                try:
                    self.avahi.wait(10)
                except subprocess.TimeoutExpired:
                    self.avahi.kill()
                    self.avahi.wait()
            self.avahi = None

    def stop(self) -> None:
        self.stop_avahi()
        if self.dbus_pid is not None:
            try:
                os.kill(self.dbus_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.dbus_pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _wait(condition, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")
