"""``stap-server``: start, stop and report compile servers like an initscript.

Output lines, exit codes and file formats follow SystemTap 4.8's manager;
the 4.8 bugs listed in ``doc/differences.md`` are fixed the way its manual
promises.  What a command line names is resolved in ``targets``, shown by
``show``, kept in the status directory of ``statdir``; daemons are started
and stopped by ``launch``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from attrs import define, evolve

from stapsrv.cli.arguments import ACTIONS, ArgumentError, Invocation, parse
from stapsrv.cli.launch import (
    LaunchFailed,
    daemon_arguments,
    is_server,
    prepare_log,
    start_daemon,
    stop_daemon,
)
from stapsrv.cli.show import mode_line, render, status_record, trusted_proxies
from stapsrv.cli.statdir import StatusDirectory, remove
from stapsrv.cli.targets import Fatal, Servers, Target
from stapsrv.cli.usage import USAGE
from stapsrv.config.files import (
    DEBIAN_GLOBAL_FILE,
    DEFAULT_GLOBAL_FILE,
    ConfigError,
    GlobalConfig,
    ServerSettings,
    read_global,
)
from stapsrv.paths import MODULES, root_refused


@define
class Manager:
    invocation: Invocation
    config: GlobalConfig
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    modules: Path = MODULES

    @property
    def stat(self) -> StatusDirectory:
        return StatusDirectory(self.config.stat_path)

    @property
    def servers(self) -> Servers:
        return Servers(self.invocation, self.config, self.stat, self.modules)

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def log(self, message: str) -> None:
        try:
            self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.log_file, "a", encoding="utf-8") as stream:
                stream.write(time.strftime("%b %e %T") + ": " + message + "\n")
        except OSError:
            pass

    def _running(self, target: Target) -> int | None:
        """The target's pid, else that of a running server of its settings."""
        if target.pid is not None:
            return target.pid
        return self.servers.running_match(target.settings)

    # ----- actions ----------------------------------------------------------

    def start(self, servers: list[ServerSettings]) -> int:
        try:
            self.config.stat_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.say("FAILED")
            self.log(f"Error: Failed to make stat directory ({self.config.stat_path})")
            self.err.write(f"Cannot create {self.config.stat_path}: {exc.strerror}\n")
            return 1
        if not os.access(self.config.stat_path, os.W_OK | os.X_OK):
            self.say("FAILED")
            self.err.write(f"stap-server: cannot write status files in {self.config.stat_path} "
                           f"(STAT_PATH): permission denied\n")
            return 1
        rc = 0
        for index, settings in enumerate(servers):
            if index:
                self.say("\n")
            line = f"stap-server {render(settings)}"
            self.say(f"Starting {line}\n")
            self.log(f"Starting {line}")
            if self.servers.running_match(settings) is not None:
                self.say("OK")
                self.log(f"Pass: stap-server start {render(settings)}")
                continue
            counters = self.config.stat_path / f".counters-{os.getpid()}-{index}"
            try:
                pid = self._launch(settings, counters)
            except LaunchFailed as exc:
                self.err.write(f"stap-server: the server did not start: {exc}\n")
                self.say("FAILED")
                self.log(f"Error: stap-server start {render(settings)}")
                remove(counters)
                rc = 1
                continue
            settings = evolve(settings, nickname=settings.nickname or str(pid))
            self.stat.record(pid, settings)
            try:
                # The server keeps the file open, so the new name is seen.
                counters.rename(self.stat.counters_file(pid))
            except OSError:
                pass
            self.say("OK")
            self.log(f"Pass: stap-server start {render(settings)}")
        return rc

    def _launch(self, settings: ServerSettings, counters: Path) -> int:
        try:
            user = pwd.getpwnam(settings.user)
        except KeyError:
            raise LaunchFailed(f"there is no user '{settings.user}'") from None
        if root_refused(user.pw_uid):
            raise LaunchFailed("servers never run as root; name their user with -u USER, "
                               "STAP_USER or USER=")
        if os.geteuid() not in (0, user.pw_uid):
            raise LaunchFailed(f"only root can start a server as another user ({user.pw_name})")
        try:
            group = grp.getgrnam("stap-server")
        except KeyError:
            group = None
        if group is not None and user.pw_gid != group.gr_gid and user.pw_name not in group.gr_mem:
            raise LaunchFailed(f"user {user.pw_name} is not in group stap-server")
        log = Path(settings.log)
        try:
            prepare_log(log, user)
        except OSError as exc:
            raise LaunchFailed(f"cannot use the log file {log}: {exc.strerror}") from None
        arguments = daemon_arguments(settings, self.invocation.keep)
        try:
            counters.touch(mode=0o644)
            os.chown(counters, user.pw_uid, user.pw_gid)
            arguments += ["--counters-file", str(counters)]
        except OSError:
            remove(counters)  # status then shows no counters; nothing else changes
        return start_daemon(arguments, user, log)

    def stop_one(self, pid: int, settings: ServerSettings) -> int:
        line = f"stap-server {render(settings)}"
        self.say(f"Stopping {line}\n")
        self.log(f"Stopping {line}")
        if is_server(pid) and not stop_daemon(pid):
            self.say("FAILED")
            self.log(f"Error: stap-server stop {render(settings)}")
            return 1
        self.stat.forget(pid)
        self.say("OK")
        self.log(f"Pass: stap-server stop {render(settings)}")
        return 0

    def stop(self, targets: list[Target] | None) -> int:
        if targets is None:
            managed = self.stat.managed()
            if not managed:
                self.say("Stopping stap-server: OK")
                self.log("Pass: stap-server: No managed servers to stop")
                return 0
            rc = 0
            for index, (pid, settings) in enumerate(managed):
                if index:
                    self.say("\n")
                rc |= self.stop_one(pid, settings)
            return rc
        rc = 0
        for index, target in enumerate(targets):
            if index:
                self.say("\n")
            if target.unknown_nickname is not None:
                self.say(f"No configuration found for the nickname '{target.unknown_nickname}'\n")
                self.say("FAILED")
                rc = 1
                continue
            running = self._running(target)
            if running is None:
                self.say(f"Stopping stap-server {render(target.settings)}\n")
                self.say("OK")
                continue
            rc |= self.stop_one(running, self.stat.recorded(running, target.settings))
        return rc

    def status(self, targets: list[Target] | None) -> int:
        """4.8's status lines (with the counters under each running server),
        or with ``--json`` the same as one JSON document."""
        report: list[dict[str, Any]] = []
        rc = self._status(targets, report)
        if self.invocation.json:
            self.say(json.dumps({"servers": report}, indent=2) + "\n")
        return rc

    def _status(self, targets: list[Target] | None, report: list[dict[str, Any]]) -> int:
        lines = not self.invocation.json
        if targets is None:
            managed = self.stat.managed()
            if not managed:
                if lines:
                    self.say("No managed stap-server is running\n")
                return 3
            rc = 0
            for pid, settings in managed:
                rc = self._status_line(pid, settings, report) or rc
            return rc
        rc = 0
        for target in targets:
            if target.unknown_nickname is not None:
                if lines:
                    self.say("No configuration found for the nickname "
                             f"'{target.unknown_nickname}'\n")
                report.append({"nickname": target.unknown_nickname, "state": "unknown"})
                rc = 3
                continue
            running = self._running(target)
            if running is None:
                if lines:
                    self.say(f"stap-server {render(target.settings)} is not running\n")
                report.append(status_record(target.settings, None, "stopped", None))
                rc = 3
                continue
            rc = self._status_line(running, self.stat.recorded(running, target.settings),
                                   report) or rc
        return rc

    def _status_line(self, pid: int, settings: ServerSettings,
                     report: list[dict[str, Any]]) -> int:
        lines = not self.invocation.json
        if is_server(pid):
            if lines:
                self.say(f"stap-server {render(settings)} running as PID {pid}\n")
                self.say(self.stat.counters_line(pid))
                self.say(mode_line(settings))
                proxies = trusted_proxies(settings)
                if proxies is not None:
                    self.say(f"  PROXY headers believed from {', '.join(proxies)} "
                             "(--proxy-from)\n")
            report.append(status_record(settings, pid, "running", self.stat.counters(pid)))
            return 0
        if lines:
            self.say(f"stap-server {render(settings)} started as PID {pid} "
                     "is no longer running\n")
        report.append(status_record(settings, pid, "dead", None))
        self.stat.forget(pid)
        return 1

    def servers_to_start(self, targets: list[Target] | None) -> list[ServerSettings]:
        if targets is not None:
            return [t.settings for t in targets]
        return self.servers.configured() or [self.servers.default_server()]

    def run(self) -> int:
        action = self.invocation.action
        targets = self.servers.targets() if self.invocation.explicit else None
        if action == "start":
            rc = self.start(self.servers_to_start(targets))
        elif action == "stop":
            rc = self.stop(targets)
        elif action == "status":
            return self.status(targets)
        elif action == "restart":
            rc = self.restart(targets)
        elif action in ("condrestart", "try-restart"):
            rc = self.condrestart(targets)
        elif action == "force-reload":
            self.stop(None)
            self.say("\n")
            rc = self.start(self.servers_to_start(targets))
        else:
            raise AssertionError(action)
        self.say("\n")
        return rc

    def restart(self, targets: list[Target] | None) -> int:
        if targets is None:
            managed = self.stat.managed()
            if not managed:
                self.stop(None)
                self.say("\n")
                return self.start(self.servers_to_start(None))
            targets = [Target(settings, pid) for pid, settings in managed]
        stop_rc = self.stop(targets)
        self.say("\n")
        start_rc = self.start([t.settings for t in targets])
        return start_rc or stop_rc

    def condrestart(self, targets: list[Target] | None) -> int:
        if targets is None:
            managed = self.stat.managed()
            if not managed:
                self.say("No managed stap-server is runningOK")
                return 0
            targets = [Target(settings, pid) for pid, settings in managed]
        rc = 0
        queued: list[ServerSettings] = []
        for index, target in enumerate(targets):
            if index:
                self.say("\n")
            pid = self._running(target)
            if pid is None or not is_server(pid):
                self.say(f"stap-server {render(target.settings)} is not running\n")
                self.say("OK")
                continue
            rc = self.stop_one(pid, self.stat.recorded(pid, target.settings)) or rc
            queued.append(self.stat.recorded(pid, target.settings))
        if queued:
            self.say("\n")
            rc = self.start(queued) or rc
        return rc


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in ACTIONS or words[0] == "usage":
        out.write(USAGE + "\n")
        return 0
    if words[0] == "reload":
        out.write("\n")
        return 3
    try:
        invocation = parse(words)
    except ArgumentError as exc:
        err.write(f"Error: Argument parse error: {exc}\n")
        out.write(USAGE)
        return 2
    try:
        config = read_global(
            [DEFAULT_GLOBAL_FILE, DEBIAN_GLOBAL_FILE, *invocation.config_files],
            dict(os.environ))
    except ConfigError as exc:
        err.write(f"{exc}\n")
        return 1
    manager = Manager(invocation, config, out, err)
    try:
        with StatusDirectory(config.stat_path).locked() if invocation.action != "status" \
                else _nolock():
            return manager.run()
    except Fatal as exc:
        if exc.code == 1 and "No stap-server running as pid" in str(exc):
            out.write(f"{exc}\n")
        else:
            err.write(f"{exc}\n")
        if exc.usage:
            out.write(USAGE)
        return exc.code
    except ConfigError as exc:
        err.write(f"{exc}\n")
        return 1


@contextmanager
def _nolock() -> Iterator[None]:
    yield


if __name__ == "__main__":
    sys.exit(main())
