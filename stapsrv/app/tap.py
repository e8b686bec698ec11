"""``twistd stap-server``: command-line options and the service tree.

The options mirror stap-serverd 4.8's, so an admin can carry flags over;
``--listen`` is new (4.8 always bound every interface).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
    DEFAULT_CACHE_MIB,
    DEFAULT_KERNEL_STORE_MIB,
    DEFAULT_COMPILE_SECONDS,
    DEFAULT_MAX_OUTPUT_MIB,
    DEFAULT_MEMORY_MIB,
    DEFAULT_REQUEST_SECONDS,
    FleetCacheError,
    SettingsError,
    configured_servers,
    release_name,
    server_config,
    settings_config,
)
from stapsrv.config.files import ConfigError, read_global
from stapsrv.config.values import (
    DEFAULT_DESCRIPTOR_RESERVE,
    DEFAULT_LISTEN_BACKLOG,
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_FETCHES,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_PEER_FETCHES,
    ServerConfig,
)
from stapsrv.core.cmdline import ServerOption
from stapsrv.paths import ROOT_REFUSAL, root_refused
from stapsrv.reactor import IServerReactor, installed_reactor


def _count(name: str, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
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
        ["listen", None, None, "Address to listen on (default: $STAPSRV_LISTEN, "
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
        ["request-timeout", None, DEFAULT_REQUEST_SECONDS,
         "Seconds a client has to finish its TLS handshake and upload, and again to "
         "take its answer (0: no limit).", _count("request-timeout", 0)],
        ["compile-timeout", None, DEFAULT_COMPILE_SECONDS,
         "Seconds the translator may run for one request before it is stopped "
         "(0: no limit).", _count("compile-timeout", 0)],
        ["cpu-limit", None, None, "CPU seconds for the translator and what it runs "
         "(each process).", _count("cpu-limit", 1)],
        ["memory-limit", None, DEFAULT_MEMORY_MIB, "Address space, in MiB, for the "
         "translator and each process it runs (0: no limit).", _count("memory-limit", 0)],
        ["file-size-limit", None, None, "Largest file, in MiB, the translator and what it "
         "runs may write.", _count("file-size-limit", 1)],
        ["process-limit", None, None, "Processes the server's user may have while the "
         "translator runs (RLIMIT_NPROC counts them all).", _count("process-limit", 1)],
        ["max-output", None, DEFAULT_MAX_OUTPUT_MIB, "MiB of the translator's standard "
         "output, and again of its standard error, sent to the client; a translator that "
         "writes more is stopped.", _count("max-output", 1)],
        ["listen-backlog", None, DEFAULT_LISTEN_BACKLOG, "Connections the kernel queues "
         "before the server accepts them (with --port/--listen; an --endpoint sets its "
         "own backlog=).", _count("listen-backlog", 1)],
        ["max-peer-connections", None, None, "Connections one client address may hold at "
         "once (behind HAProxy, the address of the PROXY header); more are closed "
         "(default: an eighth of the open files limit, at most 1024; 0: no cap).",
         _count("max-peer-connections", 0)],
        ["descriptor-reserve", None, DEFAULT_DESCRIPTOR_RESERVE, "Descriptors kept free "
         "for new clients: when fewer are free, the connections waiting longest without "
         "completing a request are closed (at most a quarter of the open files limit).",
         _count("descriptor-reserve", 1)],
        ["cache-dir", None, None, "Directory of the response cache (default: "
         "$SYSTEMTAP_DIR/stapsrv-cache or ~/.systemtap/stapsrv-cache)."],
        ["cache-size", None, DEFAULT_CACHE_MIB, "Size cap of the response cache, "
         "in MiB (least recently used answers go first).", _count("cache-size", 1)],
        ["fleet-cache", None, None, "redis://HOST:PORT/DB (or rediss://) of a cache shared "
         "by several servers (in front of it stays the local cache); needs --fleet-secret."],
        ["fleet-secret", None, None, "File holding the fleet's secret, which authenticates "
         "fleet cache entries (make one with: python3 -m stapsrv.cli.fleet secret FILE)."],
        ["fleet-password-file", None, None, "File whose first line is the fleet Redis's "
         "password (default: $STAPSRV_FLEET_PASSWORD, else none)."],
        ["counters-file", None, None, "Keep the request counters (for stap-server status) "
         "in this file."],
        ["privileges", None, None, "Privilege levels to compile for, separated by commas "
         "(default: stapusr,stapsys,stapdev)."],
        ["endpoint", None, None, "Twisted endpoint description to listen on instead of "
         "--listen/--port: tcp:PORT:interface=ADDR, haproxy:tcp:... (clients come through "
         "HAProxy with the PROXY protocol), systemd:domain=INET:index=0 (socket activation)."],
        ["metrics", None, None, "Serve Prometheus metrics (/metrics) and a health check "
         "(/healthz) over HTTP at this endpoint, e.g. tcp:9642:interface=127.0.0.1."],
        ["kernel-store", None, None, "Directory of the kernel store, where releases that are "
         "not installed are fetched (default: $XDG_CACHE_HOME/stapsrv/kernels or "
         "~/.cache/stapsrv/kernels)."],
        ["kernel-store-size", None, DEFAULT_KERNEL_STORE_MIB, "Size cap of the kernel store, "
         "in MiB (least recently used releases go first).", _count("kernel-store-size", 1)],
        ["max-fetches", None, DEFAULT_MAX_FETCHES, "Kernel store fetches (releases, symbols, "
         "debuginfo) run at once for all clients; more wait, client addresses in turn.",
         _count("max-fetches", 1)],
        ["peer-fetches", None, DEFAULT_PEER_FETCHES, "Kernel releases one client address may "
         "have kernel store work (fetches, symbols, debuginfo, warm-ups) under way for at "
         "once; past it a request is told so on a Server: line (0: no cap).",
         _count("peer-fetches", 0)],
    ]
    optFlags = [
        ["keep", "k", "Keep each request's temporary directory."],
        ["no-avahi", None, "Do not advertise the server over Avahi (mDNS)."],
        ["no-cache", None, "Compile every request, even one answered before."],
        ["no-sandbox", None, "Run translators without the bubblewrap sandbox, as 4.8 does: "
         "every client's compile can then read what the server's user can."],
        ["refuse-guru", None, "Refuse guru mode (-g) requests."],
        ["no-fetch", None, "Never fetch kernel releases that are not installed."],
        ["no-fetch-symbols", None, "Do not make served releases' System.map from their "
         "kernel image (/boot/vmlinuz-*, else linux-image-*: 27-70 MB to download, 4 MB kept)."],
        ["fetch-debuginfo", None, "Also keep each served release's vmlinux debuginfo "
         "(about 630 MB each), so kernel.function probes and $variables compile."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["releases"] = []
        self["server_options"] = []
        self["arch"] = None
        self["runtime"] = None
        self["allow"] = []
        self["proxy-from"] = []
        self["fetch-releases"] = []

    def opt_fetch_releases(self, patterns: str) -> None:
        """Shell patterns (separated by commas or blanks) of the releases that
        may be fetched into the kernel store; repeatable (default: the flavours
        of the server's own kernel series and architecture, e.g. 6.1.0-*-amd64)."""
        self["fetch-releases"].append(patterns)

    def opt_allow(self, networks: str) -> None:
        """Only clients at these addresses or CIDR networks (separated by
        commas or blanks) may use the server; repeatable (default: all)."""
        self["allow"].append(networks)

    def opt_proxy_from(self, networks: str) -> None:
        """With a haproxy: --endpoint, the addresses or CIDR networks
        (separated by commas or blanks) of the proxies whose PROXY header is
        believed; a connection from anywhere else is closed unread;
        repeatable (default: 127.0.0.0/8,::1, this host)."""
        self["proxy-from"].append(networks)

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

    def to_config(self) -> ServerConfig:
        try:
            return server_config(
                releases=self["releases"], server_options=self["server_options"],
                arch=self["arch"], runtime=self["runtime"], port=self["port"],
                listen=self["listen"], ssl=self["ssl"], log=self["log"],
                max_threads=self["max-threads"], max_request_size=self["max-request-size"],
                max_compressed_request=self["max-compressed-request"],
                keep=bool(self["keep"]), request_timeout=self["request-timeout"],
                compile_timeout=self["compile-timeout"], cpu_limit=self["cpu-limit"],
                memory_limit=self["memory-limit"], file_size_limit=self["file-size-limit"],
                process_limit=self["process-limit"], max_output=self["max-output"],
                listen_backlog=self["listen-backlog"],
                max_peer_connections=self["max-peer-connections"],
                descriptor_reserve=self["descriptor-reserve"], cache=not self["no-cache"],
                sandbox=not self["no-sandbox"], allow=self["allow"],
                refuse_guru=bool(self["refuse-guru"]), privileges=self["privileges"],
                cache_dir=self["cache-dir"], cache_size=self["cache-size"],
                fleet_cache=self["fleet-cache"], fleet_secret=self["fleet-secret"],
                fleet_password_file=self["fleet-password-file"],
                counters_file=self["counters-file"],
                endpoint=self["endpoint"], proxy_from=self["proxy-from"],
                metrics=self["metrics"],
                fetch=not self["no-fetch"], fetch_releases=self["fetch-releases"],
                kernel_store=self["kernel-store"], kernel_store_size=self["kernel-store-size"],
                max_fetches=self["max-fetches"], peer_fetches=self["peer-fetches"],
                fetch_symbols=not self["no-fetch-symbols"],
                fetch_debuginfo=bool(self["fetch-debuginfo"]))
        except FleetCacheError as exc:
            raise usage.UsageError(f"--{exc.setting}: {exc}") from None
        except SettingsError as exc:
            raise usage.UsageError(str(exc)) from None


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
