"""``twistd stap-server``: command-line options and the service tree.

The options mirror stap-serverd 4.8's, so an admin can carry flags over;
``--listen`` is new (4.8 always bound every interface).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from stapsrv.app.counters import CountersFileService
from stapsrv.app.logs import LogFileService, ReopenOnSighup
from stapsrv.app.publish import publisher_service
from stapsrv.app.service import CompileServerService
from stapsrv.app.shutdown import CleanExitOnSignal
from stapsrv.config import convert as settings
from stapsrv.config.files import ConfigError, read_global
from stapsrv.config.values import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_REQUEST_TIMEOUT,
    ServerConfig,
    default_listen,
)
from stapsrv.core.cmdline import ServerOption
from stapsrv.paths import ROOT_REFUSAL, default_server_ssl_dir, root_refused


def _count(name: str, minimum: int, maximum: int | None = None):  # type: ignore[no-untyped-def]
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(f"--{name} needs a whole number, not {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" to {maximum}"
            raise usage.UsageError(f"--{name} must be {minimum}{upper or ' or more'}, not {value}")
        return value
    return convert


def release_of_build_tree(path: str) -> str:
    try:
        return settings.release_of_build_tree(path)
    except settings.SettingsError as exc:
        raise usage.UsageError(str(exc)) from None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve SystemTap clients (stap --use-server) over TLS: run the stap "
        "translator for each request and send back the kernel module, signed "
        "for unprivileged users.  Without -r the server builds for the running "
        "kernel; each -r adds a release (or a kernel build tree) served by the "
        "same listener."
    )

    optParameters = [
        ["port", None, 0, "TCP port to listen on (0 picks a free one).",
         _count("port", 0, 65535)],
        ["listen", None, default_listen(), "Address to listen on (default: $STAPSRV_LISTEN, "
         "else :: = every address, IPv4 included)."],
        ["ssl", None, None, "Directory with the server certificate and key "
         "(default $SYSTEMTAP_DIR/ssl/server or ~/.systemtap/ssl/server)."],
        ["log", None, None, "Append the server log to this file (default: standard error)."],
        ["config", None, None, "Run every server of this stap-server global configuration "
         "file (its CONFIG_PATH/*.conf) in this process; the other server options are "
         "then not used."],
        ["max-threads", None, None, "Requests processed at once (default: number of "
         "CPUs; 0 = one at a time).", _count("max-threads", 0)],
        ["max-request-size", None, DEFAULT_MAX_REQUEST_SIZE,
         "Largest request, uncompressed, in bytes.", _count("max-request-size", 1)],
        ["max-compressed-request", None, DEFAULT_MAX_COMPRESSED_REQUEST,
         "Largest request archive, in bytes.", _count("max-compressed-request", 1)],
        ["request-timeout", None, int(DEFAULT_REQUEST_TIMEOUT),
         "Seconds a client has to finish its TLS handshake and upload, and again to "
         "take its answer (0: no limit).", _count("request-timeout", 0)],
        ["compile-timeout", None, int(DEFAULT_COMPILE_TIMEOUT),
         "Seconds the translator may run for one request before it is stopped "
         "(0: no limit).", _count("compile-timeout", 0)],
        ["cpu-limit", None, None, "CPU seconds for the translator and what it runs "
         "(each process).", _count("cpu-limit", 1)],
        ["memory-limit", None, None, "Address space, in MiB, for the translator and each "
         "process it runs.", _count("memory-limit", 1)],
        ["file-size-limit", None, None, "Largest file, in MiB, the translator and what it "
         "runs may write.", _count("file-size-limit", 1)],
        ["process-limit", None, None, "Processes the server's user may have while the "
         "translator runs (RLIMIT_NPROC counts them all).", _count("process-limit", 1)],
        ["cache-dir", None, None, "Directory of the response cache (default: "
         "$SYSTEMTAP_DIR/stapsrv-cache or ~/.systemtap/stapsrv-cache)."],
        ["cache-size", None, DEFAULT_CACHE_SIZE >> 20, "Size cap of the response cache, "
         "in MiB (least recently used answers go first).", _count("cache-size", 1)],
        ["fleet-cache", None, None, "redis://HOST:PORT/DB of a cache shared by several "
         "servers (in front of it stays the local cache)."],
        ["counters-file", None, None, "Keep the request counters (for stap-server status) "
         "in this file."],
    ]
    optFlags = [
        ["keep", "k", "Keep each request's temporary directory."],
        ["no-avahi", None, "Do not advertise the server over Avahi (mDNS)."],
        ["no-cache", None, "Compile every request, even one answered before."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["releases"] = []
        self["server_options"] = []
        self["arch"] = None
        self["runtime"] = None

    def opt_r(self, release: str) -> None:
        """Kernel release (or build tree) to build for; repeatable."""
        if release.startswith("/"):
            release = release_of_build_tree(release)
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

    def to_config(self) -> ServerConfig:
        running = os.uname().release
        releases = [running] + [r for r in self["releases"] if r != running]
        ssl_dir = Path(self["ssl"]) if self["ssl"] else default_server_ssl_dir()
        extra: dict[str, Any] = {}
        if self["max-threads"] is not None:
            extra["max_threads"] = self["max-threads"]
        return ServerConfig(
            releases=tuple(releases),
            ssl_dir=ssl_dir.absolute(),
            server_options=tuple(self["server_options"]),
            arch=self["arch"],
            runtime=self["runtime"],
            port=self["port"],
            listen=self["listen"],
            log_file=Path(self["log"]).absolute() if self["log"] else None,
            max_request_size=self["max-request-size"],
            max_compressed_request=self["max-compressed-request"],
            keep_temporary=bool(self["keep"]),
            **extra,
            **robustness_settings(self),
        )


def robustness_settings(options: usage.Options | dict[str, Any]) -> dict[str, Any]:
    """The timeout, limit, cache and counters fields of a ServerConfig."""
    try:
        fields = settings.robustness_fields(
            request_timeout=options["request-timeout"],
            compile_timeout=options["compile-timeout"],
            cpu_limit=options["cpu-limit"], memory_limit=options["memory-limit"],
            file_size_limit=options["file-size-limit"],
            process_limit=options["process-limit"], cache=not options["no-cache"],
            cache_dir=options["cache-dir"], cache_size=options["cache-size"],
            fleet_cache=options["fleet-cache"])
    except settings.SettingsError as exc:
        raise usage.UsageError(f"--fleet-cache: {exc}") from None
    counters = options["counters-file"]
    fields["counters_file"] = Path(counters).absolute() if counters else None
    return fields


def _reopen_on_sighup(top: MultiService, logs: list[LogFileService]) -> None:
    from twisted.internet import reactor
    ReopenOnSighup(logs, reactor).setServiceParent(top)


def _configured_service(options: Options) -> IService:
    try:
        global_config = read_global([Path(options["config"])], dict(os.environ))
        servers = [settings.server_config(server, global_config, f"stapsrv.{name}",
                                          bool(options["keep"]))
                   for name, server in settings.configured_servers(global_config)]
    except (ConfigError, settings.SettingsError) as exc:
        raise usage.UsageError(str(exc)) from None
    top = MultiService()
    by_log: dict[Path, set[str]] = {}
    for config in servers:
        assert config.log_file is not None
        by_log.setdefault(config.log_file, set()).add(config.log_namespace)
    logs = []
    for path, namespaces in by_log.items():
        log_service = LogFileService(path, namespaces=frozenset(namespaces))
        log_service.setServiceParent(top)
        logs.append(log_service)
    _reopen_on_sighup(top, logs)
    for config in servers:
        _add_server(top, config, publish=not options["no-avahi"])
    CleanExitOnSignal().setServiceParent(top)  # stopped first
    return top


def _add_server(top: MultiService, config: ServerConfig, publish: bool) -> None:
    """The server, then its publisher: started after the listener (so the
    port is known) and stopped before it."""
    server = CompileServerService(config)
    if config.counters_file is not None:
        # Opened before the server listens: the manager renames the file as
        # soon as the server says where it listens.
        CountersFileService(config.counters_file, server.snapshot).setServiceParent(top)
    server.setServiceParent(top)
    publisher_service(server, enabled=publish).setServiceParent(top)


def makeService(options: Options) -> IService:
    if options["config"]:
        return _configured_service(options)
    config = options.to_config()
    top = MultiService()
    if config.log_file is not None:
        log_service = LogFileService(config.log_file)
        log_service.setServiceParent(top)
        _reopen_on_sighup(top, [log_service])
    _add_server(top, config, publish=not options["no-avahi"])
    CleanExitOnSignal().setServiceParent(top)  # stopped first
    return top
