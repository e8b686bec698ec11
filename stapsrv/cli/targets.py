"""What a ``stap-server`` command line names: the servers it acts on, each
with its settings (from the command line, ``CONFIG_PATH/*.conf`` or a status
file) and its pid when it runs."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from attrs import define, evolve

from stapsrv.cli.arguments import Invocation, SpecWords
from stapsrv.cli.launch import is_server
from stapsrv.cli.statdir import StatusDirectory
from stapsrv.config.files import GlobalConfig, ServerSettings, configured_settings, read_server_file
from stapsrv.config.options import BY_NAME
from stapsrv.paths import MODULES, manager_architecture


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


def same_server(a: ServerSettings, b: ServerSettings) -> bool:
    """4.8's "same configuration": every field but the nickname (whole lists)."""
    return evolve(a, nickname="") == evolve(b, nickname="")


def _distributed(settings: ServerSettings, changes: dict[str, str]) -> ServerSettings:
    """``settings`` with the values of distributed options (by name)."""
    for name, value in changes.items():
        variable = BY_NAME[name].variable
        assert variable is not None
        settings = settings.with_value(variable, value)
    return settings


def _absolute(path: str) -> str:
    return str(Path(path).absolute()) if path else path


@define
class Servers:
    """The servers of one command: configured, running (``stat``), named."""

    invocation: Invocation
    config: GlobalConfig
    stat: StatusDirectory
    modules: Path = MODULES

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
            path = self.stat.status_file(words.pid)
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
        for pid, settings in self.stat.managed():
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
        for pid, recorded in self.stat.managed():
            if same_server(settings, recorded):
                if is_server(pid):
                    return pid
                self.stat.forget(pid)
        return None
