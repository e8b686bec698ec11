"""``twistd stap-server``: command-line options and the service tree.

The options mirror stap-serverd 4.8's, so an admin can carry flags over;
``--listen`` is new (4.8 always bound every interface).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from stapsrv.app.accepts import AcceptErrorLog
from stapsrv.app.admission import Admission
from stapsrv.app.counters import CountersFileService
from stapsrv.app.logs import LogFileService, LoggedTree, ReopenOnSighup
from stapsrv.app.metrics import MetricsService, metrics_site
from stapsrv.app.notify import SystemdNotifier
from stapsrv.app.publish import publisher_service
from stapsrv.app.service import CompileServerService
from stapsrv.app.shutdown import CleanExitOnSignal
from stapsrv.config.convert import (
    FleetCacheError,
    SettingsError,
    configured_servers,
    release_name,
    server_config,
    settings_config,
)
from stapsrv.config.files import ConfigError, read_global
from stapsrv.config.options import OPTIONS, Count, Flag, Option, Switch, Text, Words
from stapsrv.config.values import ServerConfig
from stapsrv.core.cmdline import ServerOption
from stapsrv.paths import ROOT_REFUSAL, root_refused
from stapsrv.reactor import IServerReactor, installed_reactor


def _coerce(option: Option) -> Callable[[str], int]:
    """A ``Count`` option's parser for twistd, which shows its errors."""
    assert isinstance(option.kind, Count)
    kind = option.kind

    def convert(text: str) -> int:
        try:
            return kind.from_argument(option.name, text)
        except SettingsError as exc:
            raise usage.UsageError(str(exc)) from None
    return convert


def _parameters() -> list[list[Any]]:
    """twistd's ``optParameters``: the options that take one value."""
    parameters: list[list[Any]] = []
    for option in OPTIONS:
        if isinstance(option.kind, Count):
            parameters.append([option.name, option.short, option.default, option.help,
                               _coerce(option)])
        elif isinstance(option.kind, Text):
            parameters.append([option.name, option.short, option.default, option.help])
    return parameters


def _flags() -> list[list[str | None]]:
    """twistd's ``optFlags``: a switch is on unless ``--no-NAME``."""
    return [[f"no-{option.name}" if isinstance(option.kind, Switch) else option.name,
             option.short, option.help]
            for option in OPTIONS if isinstance(option.kind, (Switch, Flag))]


def _repeatable(option: Option) -> Callable[[usage.Options, str], None]:
    """twistd's ``opt_NAME`` of a ``Words`` option: each value is kept."""
    def add(self: usage.Options, value: str) -> None:
        self[option.name].append(value)
    add.__doc__ = option.help
    add.__name__ = f"opt_{option.key}"
    return add


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve SystemTap clients (stap --use-server) over TLS: run the stap "
        "translator for each request and send back the kernel module, signed "
        "for unprivileged users.  Without -r the server builds for the running "
        "kernel; each -r adds a release (or a kernel build tree) served by the "
        "same listener."
    )

    optParameters = _parameters()
    optFlags = _flags()

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["releases"] = []
        self["server_options"] = []
        self["arch"] = None
        self["runtime"] = None
        for option in OPTIONS:
            if isinstance(option.kind, Words):
                self[option.name] = []

    def opt_r(self, release: str) -> None:
        """Kernel release (or build tree) to build for; repeatable."""
        try:
            release = release_name(release)
        except SettingsError as exc:
            raise usage.UsageError(str(exc)) from None
        if release not in self["releases"]:
            self["releases"].append(release)

    opt_release = opt_r

    def opt_a(self, arch: str) -> None:
        """Target architecture, passed to stap as -a."""
        self["arch"] = arch
        self["server_options"] = [o for o in self["server_options"] if o.flag != "-a"]
        self["server_options"].insert(0, ServerOption("-a", arch))

    opt_arch = opt_a

    def opt_I(self, directory: str) -> None:
        """Tapset directory for every request (stap -I); repeatable."""
        self["server_options"].append(ServerOption("-I", directory))

    opt_include = opt_I

    def opt_D(self, definition: str) -> None:
        """Preprocessor definition for every request (stap -D); repeatable."""
        self["server_options"].append(ServerOption("-D", definition))

    opt_define = opt_D

    def opt_B(self, option: str) -> None:
        """Option for the kernel build (stap -B); repeatable."""
        self["server_options"].append(ServerOption("-B", option))

    opt_build = opt_B

    def opt_R(self, directory: str) -> None:
        """Runtime directory (stap -R); overrides the built-in runtime fix."""
        self["runtime"] = directory
        self["server_options"].append(ServerOption("-R", directory))

    opt_runtime = opt_R

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        dropping = parent is not None and parent.get("uid") not in (None, 0)
        if root_refused(os.geteuid()) and not dropping:
            raise usage.UsageError(ROOT_REFUSAL)

    def value(self, option: Option) -> Any:
        """An option's value as given (a switch: True unless ``--no-NAME``)."""
        if isinstance(option.kind, Switch):
            return not self[f"no-{option.name}"]
        if isinstance(option.kind, Flag):
            return bool(self[option.name])
        return self[option.name]

    def to_config(self) -> ServerConfig:
        values = {option.key: self.value(option) for option in OPTIONS}
        try:
            return server_config(
                releases=self["releases"], server_options=self["server_options"],
                arch=self["arch"], runtime=self["runtime"], **values)
        except FleetCacheError as exc:
            raise usage.UsageError(f"--{exc.setting}: {exc}") from None
        except SettingsError as exc:
            raise usage.UsageError(str(exc)) from None


for _option in OPTIONS:
    if isinstance(_option.kind, Words):
        setattr(Options, f"opt_{_option.key}", _repeatable(_option))


def _configured_service(options: Options, reactor: IServerReactor) -> IService:
    try:
        global_config = read_global([Path(options["config"])], dict(os.environ))
        servers = [settings_config(server, global_config, f"stapsrv.{name}",
                                   bool(options["keep"]))
                   for name, server in configured_servers(global_config)]
    except (ConfigError, SettingsError) as exc:
        raise usage.UsageError(str(exc)) from None
    top = LoggedTree()
    by_log: dict[Path, set[str]] = {}
    for config in servers:
        assert config.log_file is not None
        by_log.setdefault(config.log_file, set()).add(config.log_namespace)
    logs = []
    for path, namespaces in by_log.items():
        log_service = LogFileService(path, namespaces=frozenset(namespaces))
        top.add_log(log_service)
        logs.append(log_service)
    top.add_log(ReopenOnSighup(logs, reactor))
    # Descriptors are the process's: its servers share one reserve, the largest.
    admission = Admission(reactor, max(config.descriptor_reserve for config in servers))
    for config in servers:
        _add_server(top, config, reactor, publish=not options["no-avahi"],
                    admission=admission)
    AcceptErrorLog(reactor).setServiceParent(top)
    SystemdNotifier(os.environ).setServiceParent(top)  # started once all listen
    CleanExitOnSignal(reactor).setServiceParent(top)  # stopped first
    return top


def _add_server(top: LoggedTree, config: ServerConfig, reactor: IServerReactor,
                publish: bool, admission: Admission | None = None) -> None:
    """The server, then its publisher: started after the listener (so the
    port is known) and stopped before it."""
    server = CompileServerService(config, reactor, admission)
    if config.counters_file is not None:
        # Opened before the server listens: the manager renames the file as
        # soon as the server says where it listens.
        CountersFileService(config.counters_file, server.snapshot,
                            reactor).setServiceParent(top)
    server.setServiceParent(top)
    metrics = server.metrics
    if config.metrics and metrics is not None:
        # After the server: /healthz then finds it listening.
        MetricsService(config.metrics, lambda: metrics_site(metrics, server.health),
                       reactor, server.log).setServiceParent(top)
    publisher_service(server, reactor, enabled=publish).setServiceParent(top)


def makeService(options: Options, reactor: IServerReactor | None = None) -> IService:
    """The service tree; every part runs on ``reactor`` (twistd's)."""
    reactor = reactor or installed_reactor()
    if options["config"]:
        return _configured_service(options, reactor)
    config = options.to_config()
    top = LoggedTree()
    if config.log_file is not None:
        log_service = LogFileService(config.log_file)
        top.add_log(log_service)
        top.add_log(ReopenOnSighup([log_service], reactor))
    _add_server(top, config, reactor, publish=not options["no-avahi"])
    AcceptErrorLog(reactor).setServiceParent(top)
    SystemdNotifier(os.environ).setServiceParent(top)  # started once it listens
    CleanExitOnSignal(reactor).setServiceParent(top)  # stopped first
    return top
