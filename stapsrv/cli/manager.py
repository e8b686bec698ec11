"""``stap-server``: start, stop and report compile servers like an initscript.

Output lines, exit codes and file formats follow SystemTap 4.8's manager;
the 4.8 bugs listed in ``doc/differences.md`` are fixed the way its manual
promises.
"""

from __future__ import annotations

import fcntl
import grp
import ipaddress
import json
import os
import pwd
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from attrs import define, evolve

from stapsrv.cli.arguments import ACTIONS, ArgumentError, Invocation, SpecWords, parse
from stapsrv.cli.launch import LaunchFailed, is_server, start_daemon, stop_daemon
from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, proxied
from stapsrv.config.files import (
    DEBIAN_GLOBAL_FILE,
    DEFAULT_GLOBAL_FILE,
    ConfigError,
    GlobalConfig,
    ServerSettings,
    configured_settings,
    read_global,
    read_server_file,
    render_status,
)
from stapsrv.config.options import BY_NAME, MANAGER_OPTIONS, SWITCH_NO, SettingsError
from stapsrv.core import counters as request_counters
from stapsrv.paths import MODULES, manager_architecture, root_refused
from stapsrv.vm import verification

_USAGE = """\
Usage: stap-server {start|stop|restart|condrestart|try-restart|force-reload|status} [options]
Options:
\t-c configfile\t: specify additional global configuration file.
\t-a arch\t\t: specify the target architecture.
\t-r release\t: specify the kernel release (or a kernel build tree).
\t-I path\t\t: specify an additional path to search for tapsets.
\t-R path\t\t: specify the location of the systemtap runtime.
\t-B options\t: specify 'make' options for building systemtap modules.
\t-D name[=value]\t: add a macro definition for building systemtap modules.
\t-u username\t: specify the user who will run the server(s).
\t-i\t\t: one server for every kernel release under /lib/modules.
\t-n nickname\t: a server by nickname; repeat to name several servers.
\t-p pid\t\t: a running server by process id; repeat to name several.
\t-k\t\t: keep the temporary files of each request.
@OPTIONS@\t--json\t\t\t: (status) print the status as one JSON document.

All options may be repeated.  -a, -r, -I, -R, -B, -D, -u and -i describe the
server named by the -n or -p before them (or the one server of the command
line); --log, --port, --ssl, the --max-* options, the policy options
(--sandbox, --allow, --refuse-guru, --privileges), --endpoint, --proxy-from, --metrics,
the timeout, limit, cache and kernel store options are handed to the named
servers in order; servers beyond their count get the default log
(LOG_FILE), a free port, ~/.systemtap/ssl/server and the built-in limits.

With no server named, 'start' starts every server configured in
CONFIG_PATH/*.conf, or one server for the running kernel when none is
configured; 'stop', 'restart' and 'status' act on every running server.
Servers never run as root: name their user with -u, STAP_USER or USER=.
"""


USAGE = _USAGE.replace("@OPTIONS@", "".join(
    f"\t{option.usage}\n" for option in MANAGER_OPTIONS if option.usage))


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(settings: ServerSettings, nickname: bool = True) -> str:
    """A server as 4.8 prints it (``-a "x86_64" -u "srv" --log "..."``)."""
    s = settings
    words = [f"-a {_quote(s.arch)}"]
    words += [f"-r {_quote(r)}" for r in s.releases]
    if s.runtime:
        words.append(f"-R {_quote(s.runtime)}")
    words += [f"-D {_quote(d)}" for d in s.defines]
    words += [f"-I {_quote(i)}" for i in s.includes]
    words += [f"-B {_quote(b)}" for b in s.builds]
    words.append(f"-u {_quote(s.user)}")
    if nickname and s.nickname:
        words.append(f"-n {_quote(s.nickname)}")
    words.append(f"--log {_quote(s.log)}")
    for option in MANAGER_OPTIONS:
        assert option.variable is not None
        value = s.get(option.variable)
        if value and option.name != "log":
            # As shown: a fleet cache's URL without its password.
            words.append(f"--{option.name} {_quote(option.shown(value))}")
    return " ".join(words)


def status_record(settings: ServerSettings, pid: int | None, state: str,
                  counters: request_counters.Counters | None) -> dict[str, Any]:
    """One server in ``status --json``: what the status lines say, as values
    (``state``: running, stopped, dead; ``counters``: null when the server
    keeps none)."""
    s = settings
    return {
        "command": f"stap-server {render(s)}",
        "nickname": s.nickname or None,
        "pid": pid,
        "state": state,
        "user": s.user or None,
        "releases": list(s.releases),
        "port": int(s.port) if s.port.isdigit() else None,
        "endpoint": s.get("ENDPOINT") or None,
        "proxy_from": trusted_proxies(s),
        "metrics": s.get("METRICS") or None,
        "log": s.log or None,
        "sandbox": s.get("SANDBOX").lower() not in SWITCH_NO,
        "counters": None if counters is None else {
            name: getattr(counters, name) for name in request_counters.FIELDS},
        "verified": verified_releases(settings),
    }


def server_store(settings: ServerSettings) -> Path | None:
    """The server's kernel store: KERNEL_STORE, else the default under its
    user's cache directory (``$XDG_CACHE_HOME`` only when we are that user)."""
    if settings.get("KERNEL_STORE"):
        return Path(settings.get("KERNEL_STORE"))
    try:
        user = pwd.getpwnam(settings.user) if settings.user else pwd.getpwuid(os.geteuid())
    except KeyError:
        return None
    cache = os.environ.get("XDG_CACHE_HOME") if os.geteuid() == user.pw_uid else None
    return Path(cache or Path(user.pw_dir) / ".cache") / "stapsrv" / "kernels"


def verified_releases(settings: ServerSettings) -> list[dict[str, Any]]:
    """What ``kernels verify`` found for the releases of the server's store."""
    store = server_store(settings)
    return [] if store is None else [found.as_json() for found in verification.load_all(store)]


def trusted_proxies(settings: ServerSettings) -> list[str] | None:
    """The networks a server believes PROXY headers from (its PROXY_FROM,
    else the default), or None when its endpoint reads no PROXY header."""
    endpoint = settings.get("ENDPOINT")
    if not (endpoint and proxied(endpoint)):
        return None
    words = [word for word in re.split(r"[\s,]+", settings.get("PROXY_FROM")) if word]
    return [_network_text(word) for word in words] or list(DEFAULT_PROXY_FROM)


def _network_text(word: str) -> str:
    """A network as the server logs it (``192.0.2.1/32``); what does not
    parse (the server refuses to start with it) as written."""
    try:
        return str(ipaddress.ip_network(word, strict=False))
    except ValueError:
        return word


def same_server(a: ServerSettings, b: ServerSettings) -> bool:
    """4.8's "same configuration": every field but the nickname (whole lists)."""
    return evolve(a, nickname="") == evolve(b, nickname="")


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


def _distributed(settings: ServerSettings, changes: dict[str, str]) -> ServerSettings:
    """``settings`` with the values of distributed options (by name)."""
    for name, value in changes.items():
        variable = BY_NAME[name].variable
        assert variable is not None
        settings = settings.with_value(variable, value)
    return settings


class Fatal(Exception):
    """Ends the whole command: message on stderr, then this exit code."""

    def __init__(self, message: str, code: int = 1, usage: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.usage = usage


@define
class Target:
    """One server a command acts on: its settings, and its pid when known."""

    settings: ServerSettings
    pid: int | None = None
    unknown_nickname: str | None = None


@define
class Manager:
    invocation: Invocation
    config: GlobalConfig
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    modules: Path = MODULES

    # ----- what the command line names -----------------------------------

    def default_user(self) -> str:
        return self.config.stap_user or pwd.getpwuid(os.getuid()).pw_name

    def base(self) -> ServerSettings:
        return ServerSettings(arch=manager_architecture(), user=self.default_user(),
                              log=str(self.config.log_file))

    def with_defaults(self, settings: ServerSettings) -> ServerSettings:
        """The defaults a configured server gets (manager.md 8.3)."""
        return evolve(settings, arch=settings.arch or manager_architecture(),
                      releases=settings.releases or (os.uname().release,),
                      user=settings.user or self.default_user(),
                      log=settings.log or str(self.config.log_file))

    def managed(self) -> list[tuple[int, ServerSettings]]:
        """Status files in name order (only ``<pid>.stat``)."""
        found = []
        try:
            entries = sorted(self.config.stat_path.iterdir(), key=lambda p: p.name)
        except OSError:
            return []
        for path in entries:
            if path.suffix == ".stat" and path.stem.isdigit():
                found.append((int(path.stem), read_server_file(path)))
        return found

    def configured(self) -> list[ServerSettings]:
        return [self.with_defaults(settings) for _, settings in configured_settings(self.config)]

    def targets(self) -> list[Target]:
        targets = [self._target(words) for words in self.invocation.specs]
        distributed = self.invocation.distributed
        for index, target in enumerate(targets):
            changes = {name: values[index] for name, values in distributed.items()
                       if index < len(values)}
            if changes:
                target.settings = _distributed(target.settings, changes)
        return targets

    def default_server(self) -> ServerSettings:
        settings = self.base()
        distributed = self.invocation.distributed
        return _distributed(settings, {name: values[0] for name, values in distributed.items()
                                       if values})

    def _target(self, words: SpecWords) -> Target:
        target = Target(self.base())
        if words.pid is not None:
            path = self.config.stat_path / f"{words.pid}.stat"
            if not words.pid.isdigit() or not path.is_file():
                raise Fatal(f"No stap-server running as pid {words.pid}", 1, usage=False)
            target = Target(read_server_file(path), int(words.pid))
        elif words.nickname is not None:
            target = self._by_nickname(words.nickname)
        settings = target.settings
        for flag, value in words.changes:
            if flag == "-a":
                settings = evolve(settings, arch=value)
            elif flag == "-r":
                settings = evolve(settings, releases=settings.releases + (self._release(value),))
            elif flag == "-i":
                found = sorted(p.name for p in self.modules.iterdir()) if self.modules.is_dir() else []
                settings = evolve(settings, releases=settings.releases + tuple(found))
            elif flag == "-I":
                settings = evolve(settings, includes=settings.includes + (_absolute(value),))
            elif flag == "-D":
                settings = evolve(settings, defines=settings.defines + (value,))
            elif flag == "-B":
                settings = evolve(settings, builds=settings.builds + (value,))
            elif flag == "-R":
                settings = evolve(settings, runtime=_absolute(value))
            elif flag == "-u":
                settings = evolve(settings, user=value)
        if words.changes and target.unknown_nickname is None and words.nickname is not None:
            # A configured server changed by further options is another server.
            settings = evolve(settings, nickname="")
            target.pid = None
        if words.changes and words.pid is not None:
            settings = evolve(settings, nickname="")
            target.pid = None
        target.settings = settings
        return target

    def _by_nickname(self, nickname: str) -> Target:
        for pid, settings in self.managed():
            if settings.nickname == nickname and is_server(pid):
                return Target(settings, pid)
        for settings in self.configured():
            if settings.nickname == nickname:
                return Target(settings)
        return Target(evolve(self.base(), nickname=nickname), unknown_nickname=nickname)

    def _release(self, value: str) -> str:
        if value.startswith("/"):
            release_file = Path(value) / "include" / "config" / "kernel.release"
            try:
                if release_file.read_text().strip():
                    return value
            except OSError:
                pass
            raise Fatal(f"Missing {release_file}", 2, usage=True)
        return value

    def running_match(self, settings: ServerSettings) -> int | None:
        for pid, recorded in self.managed():
            if same_server(settings, recorded):
                if is_server(pid):
                    return pid
                self._forget(pid)
        return None

    # ----- output and files ----------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def log(self, message: str) -> None:
        import time
        try:
            self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.log_file, "a", encoding="utf-8") as stream:
                stream.write(time.strftime("%b %e %T") + ": " + message + "\n")
        except OSError:
            pass

    def _forget(self, pid: int) -> None:
        for suffix in (".stat", ".counters"):
            try:
                (self.config.stat_path / f"{pid}{suffix}").unlink()
            except FileNotFoundError:
                pass

    def _counters_line(self, pid: int) -> str:
        """The running server's request counters, as a status line."""
        try:
            text = (self.config.stat_path / f"{pid}.counters").read_text()
        except OSError:
            return ""
        values = request_counters.parse(text)
        return request_counters.describe(values) if values is not None else ""

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
            if self.running_match(settings) is not None:
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
                _remove(counters)
                rc = 1
                continue
            settings = evolve(settings, nickname=settings.nickname or str(pid))
            status = self.config.stat_path / f"{pid}.stat"
            status.write_text(render_status(settings))
            try:
                # The server keeps the file open, so the new name is seen.
                counters.rename(self.config.stat_path / f"{pid}.counters")
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
            _prepare_log(log, user)
        except OSError as exc:
            raise LaunchFailed(f"cannot use the log file {log}: {exc.strerror}") from None
        arguments = daemon_arguments(settings, self.invocation.keep)
        try:
            counters.touch(mode=0o644)
            os.chown(counters, user.pw_uid, user.pw_gid)
            arguments += ["--counters-file", str(counters)]
        except OSError:
            _remove(counters)  # status then shows no counters; nothing else changes
        return start_daemon(arguments, user, log)

    def stop_one(self, pid: int, settings: ServerSettings) -> int:
        line = f"stap-server {render(settings)}"
        self.say(f"Stopping {line}\n")
        self.log(f"Stopping {line}")
        if is_server(pid) and not stop_daemon(pid):
            self.say("FAILED")
            self.log(f"Error: stap-server stop {render(settings)}")
            return 1
        self._forget(pid)
        self.say("OK")
        self.log(f"Pass: stap-server stop {render(settings)}")
        return 0

    def stop(self, targets: list[Target] | None) -> int:
        if targets is None:
            managed = self.managed()
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
            running = target.pid if target.pid is not None else self.running_match(target.settings)
            if running is None:
                self.say(f"Stopping stap-server {render(target.settings)}\n")
                self.say("OK")
                continue
            rc |= self.stop_one(running, self._recorded(running, target.settings))
        return rc

    def _recorded(self, pid: int, fallback: ServerSettings) -> ServerSettings:
        path = self.config.stat_path / f"{pid}.stat"
        try:
            return read_server_file(path)
        except (OSError, ConfigError):
            return fallback

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
            managed = self.managed()
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
            running = target.pid if target.pid is not None else self.running_match(target.settings)
            if running is None:
                if lines:
                    self.say(f"stap-server {render(target.settings)} is not running\n")
                report.append(status_record(target.settings, None, "stopped", None))
                rc = 3
                continue
            rc = self._status_line(running, self._recorded(running, target.settings),
                                   report) or rc
        return rc

    def _counters(self, pid: int) -> request_counters.Counters | None:
        try:
            text = (self.config.stat_path / f"{pid}.counters").read_text()
        except OSError:
            return None
        return request_counters.parse(text)

    def _status_line(self, pid: int, settings: ServerSettings,
                     report: list[dict[str, Any]]) -> int:
        lines = not self.invocation.json
        if is_server(pid):
            if lines:
                self.say(f"stap-server {render(settings)} running as PID {pid}\n")
                self.say(self._counters_line(pid))
                self.say(_mode_line(settings))
                proxies = trusted_proxies(settings)
                if proxies is not None:
                    self.say(f"  PROXY headers believed from {', '.join(proxies)} "
                             "(--proxy-from)\n")
            report.append(status_record(settings, pid, "running", self._counters(pid)))
            return 0
        if lines:
            self.say(f"stap-server {render(settings)} started as PID {pid} "
                     "is no longer running\n")
        report.append(status_record(settings, pid, "dead", None))
        self._forget(pid)
        return 1

    def servers_to_start(self, targets: list[Target] | None) -> list[ServerSettings]:
        if targets is not None:
            return [t.settings for t in targets]
        return self.configured() or [self.default_server()]

    def run(self) -> int:
        action = self.invocation.action
        targets = self.targets() if self.invocation.explicit else None
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
            managed = self.managed()
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
            managed = self.managed()
            if not managed:
                self.say("No managed stap-server is runningOK")
                return 0
            targets = [Target(settings, pid) for pid, settings in managed]
        rc = 0
        queued: list[ServerSettings] = []
        for index, target in enumerate(targets):
            if index:
                self.say("\n")
            pid = target.pid if target.pid is not None else self.running_match(target.settings)
            if pid is None or not is_server(pid):
                self.say(f"stap-server {render(target.settings)} is not running\n")
                self.say("OK")
                continue
            rc = self.stop_one(pid, self._recorded(pid, target.settings)) or rc
            queued.append(self._recorded(pid, target.settings))
        if queued:
            self.say("\n")
            rc = self.start(queued) or rc
        return rc


def _absolute(path: str) -> str:
    return str(Path(path).absolute()) if path else path


def _prepare_log(log: Path, user: pwd.struct_passwd) -> None:
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



def _mode_line(settings: ServerSettings) -> str:
    """The line ``status`` prints about how the server runs translators (a
    server whose sandbox cannot run refuses to start, so the setting says
    what runs)."""
    if settings.get("SANDBOX").lower() in SWITCH_NO:
        return "  translators run without a sandbox (--sandbox no: 4.8's exposure)\n"
    return "  translators run in a bubblewrap sandbox\n"

def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


@contextmanager
def _locked(stat_path: Path) -> Iterator[None]:
    """One manager at a time per status directory (4.8 had no lock)."""
    try:
        stat_path.mkdir(parents=True, exist_ok=True)
        handle = open(stat_path / ".lock", "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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
        with _locked(config.stat_path) if invocation.action != "status" else _nolock():
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
