"""Starting, finding and stopping server daemons for the ``stap-server`` manager.

Each server is one ``twistd --nodaemon stap-server ...`` process, run as
its user (through ``setpriv`` when the manager is root).  A start counts
only once the daemon has logged its listening address; a daemon that exits
first is a failed start, with the reason taken from its log.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from stapsrv.config.files import ServerSettings
from stapsrv.config.options import MANAGER_OPTIONS, SettingsError
from stapsrv.paths import ROOT_OVERRIDE

#: How long a daemon may take to start listening (a first start makes an
#: RSA-4096 key and a runtime copy) and to stop (requests being compiled
#: are let finish first).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0

_MARKER = b"stap-server"


class LaunchFailed(Exception):
    pass


def twistd_command() -> list[str]:
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def is_server(pid: int) -> bool:
    """Is ``pid`` a live stapsrv daemon (not a zombie, not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and _MARKER in cmdline.split(b"\0")


def user_environment(user: pwd.struct_passwd) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": user.pw_dir,
           "USER": user.pw_name, "LOGNAME": user.pw_name, "LANG": "C.UTF-8"}
    for name in ("TMPDIR", "SYSTEMTAP_DIR", "SYSTEMTAP_STAP", ROOT_OVERRIDE,
                 "DBUS_SYSTEM_BUS_ADDRESS", "XDG_CACHE_HOME"):
        if name in os.environ and os.geteuid() == user.pw_uid:
            env[name] = os.environ[name]
    if os.environ.get("STAPSRV_LISTEN"):
        env["STAPSRV_LISTEN"] = os.environ["STAPSRV_LISTEN"]
    return env


def start_daemon(arguments: Sequence[str], user: pwd.struct_passwd, log: Path,
                 timeout: float = START_TIMEOUT) -> int:
    """Start one daemon and wait until it listens.  Returns its pid."""
    argv = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile=/dev/null",
            "stap-server", *arguments]
    if os.geteuid() != user.pw_uid:
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                "--init-groups", *argv]
    try:
        offset = log.stat().st_size
    except OSError:
        offset = 0
    errors_file = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, env=user_environment(user), cwd="/",
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=errors_file, start_new_session=True)
    marker = f"===== compile server pid {process.pid} starting".encode()
    deadline = time.monotonic() + timeout
    while True:
        own = _own_lines(log, offset, marker)
        if any(b"Using network address" in line for line in own):
            errors_file.close()
            return process.pid
        if process.poll() is not None:
            errors_file.seek(0)
            errors = errors_file.read().decode(errors="replace")
            errors_file.close()
            raise LaunchFailed(_reason(own, errors, process.returncode))
        if time.monotonic() > deadline:
            stop_daemon(process.pid)
            raise LaunchFailed(f"it did not start listening within {timeout:.0f} s")
        time.sleep(0.05)


def _own_lines(log: Path, offset: int, marker: bytes) -> list[bytes]:
    """This daemon's lines in a log that other servers may share."""
    try:
        with open(log, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except OSError:
        return []
    start = data.find(marker)
    if start < 0:
        return []
    lines = data[start:].splitlines()
    for index, line in enumerate(lines[1:], 1):
        if b"===== compile server pid" in line:
            return lines[:index]
    return lines


_FAILURE_LINES = ("Server start failed: ", "Error setting socket address",
                  "For security reasons", "Unable to")


def _reason(lines: list[bytes], errors: str, code: int) -> str:
    for line in lines:
        text = line.decode(errors="replace")
        _, _, message = text.partition(": ")
        if message.startswith(_FAILURE_LINES):
            return message.strip()
    detail = errors.strip().splitlines()[-1] if errors.strip() else ""
    return detail or f"it exited with status {code} before listening"


def stop_daemon(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, wait (requests in progress finish), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_server(pid):
            _reap(pid)
            return True
        _reap(pid)
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.1)
    _reap(pid)
    return not is_server(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def daemon_arguments(settings: ServerSettings, keep: bool) -> list[str]:
    s = settings
    args = ["-a", s.arch] if s.arch else []
    for release in s.releases:
        args += ["-r", release]
    for flag, values in (("-I", s.includes), ("-D", s.defines), ("-B", s.builds)):
        for value in values:
            args += [flag, value]
    if s.runtime:
        args += ["-R", s.runtime]
    args += ["--log", s.log]
    for option in MANAGER_OPTIONS:
        assert option.variable is not None
        if option.name != "log":
            try:
                args += option.daemon_arguments(s.get(option.variable))
            except SettingsError as exc:
                raise LaunchFailed(str(exc)) from None
    if keep:
        args.append("-k")
    return args


def prepare_log(log: Path, user: pwd.struct_passwd) -> None:
    """The log's directory must exist and the server user must write the log."""
    if not log.parent.exists():
        log.parent.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(log.parent, user.pw_uid, user.pw_gid)
    if os.geteuid() == 0 and user.pw_uid != 0:
        if not log.exists():
            log.touch(mode=0o644)
        if log.stat().st_uid == 0:
            # Made by root (this manager's own log lines): the server writes it.
            os.chown(log, user.pw_uid, user.pw_gid)
        if not _writable_by(log, user):
            raise PermissionError(13, f"not writable by {user.pw_name}")


def _writable_by(path: Path, user: pwd.struct_passwd) -> bool:
    info = path.stat()
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if info.st_uid == user.pw_uid:
        return bool(info.st_mode & 0o200)
    if info.st_gid in groups:
        return bool(info.st_mode & 0o020)
    return bool(info.st_mode & 0o002)
