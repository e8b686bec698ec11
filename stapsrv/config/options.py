"""The server's options, in one table.

Every option the server takes is one ``Option`` in ``OPTIONS``: its name,
kind (which says how its text is read), default, help, its configuration
file variable and ``stap-server`` flag when it has them, and how its value
becomes a ``ServerConfig`` field.  The ``twistd stap-server`` options
(``stapsrv.app.tap``), the configuration grammar (``stapsrv.config.files``),
the manager's command line, usage and status lines (``stapsrv.cli``) and
the conversion to a ``ServerConfig`` (``stapsrv.config.convert``) are all
read from it.  4.8's translator options (``-a -r -I -D -B -R``), which say
what is built rather than how the server runs, keep their own code.

Adding an option: one ``Option`` here (a ``variable`` gives it a
configuration file variable, ``manager=True`` a ``stap-server --NAME
VALUE`` flag, ``usage`` a line in the manager's usage, ``field`` and
``convert`` its ``ServerConfig`` field), that field in
``stapsrv.config.values``, and its use.  Only a value made from several
options together needs ``stapsrv.config.convert._joined``.  The manual
pages (``doc/stap-server.8``, ``doc/cs/stap-server.8``) and the admin
guide say what it does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from attrs import frozen

from stapsrv.config.endpoints import EndpointError, check
from stapsrv.config.fleeturl import display_url
from stapsrv.config.values import (
    DEFAULT_ADDRESS_SPACE,
    DEFAULT_CACHE_SIZE,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_DESCRIPTOR_RESERVE,
    DEFAULT_KERNEL_STORE_SIZE,
    DEFAULT_LISTEN_BACKLOG,
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_FETCHES,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_PEER_FETCHES,
    DEFAULT_REQUEST_TIMEOUT,
)
from stapsrv.core.architectures import ArchitectureError, parse_architectures
from stapsrv.core.aptsources import AptSuite, SuiteError, parse_suites
from stapsrv.core.cmdline import ALL_PRIVILEGES
from stapsrv.core.policyvalues import PolicyError, parse_networks, parse_privileges
from stapsrv.paths import default_server_ssl_dir

#: Defaults of the sizes counted in MiB, and of the timeouts, in whole units.
DEFAULT_CACHE_MIB = DEFAULT_CACHE_SIZE >> 20
DEFAULT_KERNEL_STORE_MIB = DEFAULT_KERNEL_STORE_SIZE >> 20
DEFAULT_REQUEST_SECONDS = int(DEFAULT_REQUEST_TIMEOUT)
DEFAULT_COMPILE_SECONDS = int(DEFAULT_COMPILE_TIMEOUT)
DEFAULT_MEMORY_MIB = DEFAULT_ADDRESS_SPACE >> 20
DEFAULT_MAX_OUTPUT_MIB = DEFAULT_MAX_OUTPUT >> 20

#: The values that mean "no" and "yes" for a yes/no variable.
SWITCH_NO = ("no", "off", "0", "false")
SWITCH_YES = ("", "yes", "on", "1", "true")


class SettingsError(ValueError):
    """A value no server can run with; the message says which and why."""


# --- kinds: how an option's text is read ----------------------------------------


@frozen
class Count:
    """A whole number from ``minimum`` (to ``maximum``); ``too_big`` names
    what a file's value past ``maximum`` is not."""

    minimum: int
    maximum: int | None = None
    too_big: str = ""

    def from_argument(self, name: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SettingsError(f"--{name} needs a whole number, not {text!r}") from None
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            upper = "" if self.maximum is None else f" to {self.maximum}"
            raise SettingsError(
                f"--{name} must be {self.minimum}{upper or ' or more'}, not {value}")
        return value

    def from_variable(self, variable: str, text: str) -> int | None:
        if not text:
            return None
        if not re.fullmatch(r"\d+", text) or int(text) < self.minimum:
            raise SettingsError(
                f"{variable}={text} is not a whole number of at least {self.minimum}")
        if self.maximum is not None and int(text) > self.maximum:
            raise SettingsError(f"{variable}={text} is not {self.too_big}")
        return int(text)


@frozen
class Text:
    """A string (a path, a URL, a description), used as given."""

    def from_variable(self, variable: str, text: str) -> str | None:
        return text or None


def _yes_no(variable: str, text: str) -> bool | None:
    if text.lower() not in SWITCH_NO + SWITCH_YES:
        raise SettingsError(f"{variable}={text} is not yes or no")
    return None if not text else text.lower() not in SWITCH_NO


@frozen
class Switch:
    """On unless switched off: ``--no-NAME``, ``VARIABLE=no``, ``--NAME no``."""

    def from_variable(self, variable: str, text: str) -> bool | None:
        return _yes_no(variable, text)


@frozen
class Flag:
    """Off unless switched on: ``--NAME``, ``VARIABLE=yes``, ``--NAME yes``."""

    def from_variable(self, variable: str, text: str) -> bool | None:
        return _yes_no(variable, text)


@frozen
class Words:
    """Words separated by commas or blanks; the option may be repeated (a
    file's variable holds them on one line)."""

    def from_variable(self, variable: str, text: str) -> list[str] | None:
        return [text] if text else None


Kind = Count | Text | Switch | Flag | Words


def _same(value: Any) -> Any:
    return value


@frozen
class Option:
    """One option.  ``default`` is in the option's own units (MiB, seconds);
    ``field`` is the ``ServerConfig`` field that ``convert`` of the value
    sets (None: none, or one set from several options by
    ``stapsrv.config.convert``; a converted None leaves the field's
    default).  ``variable`` is the configuration file's (``stock``: 4.8's
    own, which status files always carry); ``manager``: ``stap-server``
    takes ``--NAME VALUE`` for each server it names and passes it on, with
    ``usage`` as its line in the usage text.  ``scope``: ``global`` options
    are the process's (or the manager command's), not one server's."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    short: str | None = None
    variable: str | None = None
    stock: bool = False
    manager: bool = False
    usage: str | None = None
    scope: Literal["server", "global"] = "server"
    field: str | None = None
    convert: Callable[[Any], Any] = _same
    #: How ``stap-server`` shows a variable's value (status, its log).
    shown: Callable[[str], str] = _same

    @property
    def key(self) -> str:
        """The option as a Python name (``max_threads``)."""
        return self.name.replace("-", "_")

    @property
    def initial(self) -> Any:
        """The value when the option is not given."""
        if isinstance(self.kind, Switch):
            return True
        if isinstance(self.kind, Flag):
            return False
        if isinstance(self.kind, Words):
            return []
        return self.default

    def from_variable(self, text: str) -> Any:
        """A configuration file's value (empty: the default)."""
        assert self.variable is not None
        value = self.kind.from_variable(self.variable, text)
        return self.initial if value is None else value

    def daemon_arguments(self, text: str) -> list[str]:
        """The ``twistd stap-server`` words for a variable's value."""
        if isinstance(self.kind, (Switch, Flag)):
            assert self.variable is not None
            try:
                value = _yes_no(self.variable, text)
            except SettingsError:
                raise SettingsError(f"{self.variable}={text} (--{self.name}) is not yes or "
                                    "no") from None
            if isinstance(self.kind, Switch):
                return [f"--no-{self.name}"] if value is False else []
            return [f"--{self.name}"] if value else []
        return [f"--{self.name}", text] if text else []


# --- conversions to ServerConfig fields -------------------------------------------


def absolute_path(path: str | None) -> Path | None:
    return Path(path).absolute() if path else None


def _mebibytes(value: int) -> int:
    return value << 20


def _or_none(text: str | None) -> str | None:
    return text or None


def _words(values: Iterable[str]) -> list[str]:
    return [word for value in values for word in re.split(r"[\s,]+", value) if word]


def _ssl_dir(path: str | None) -> Path:
    return (Path(path) if path else default_server_ssl_dir()).absolute()


def _networks(values: Iterable[str]) -> tuple[str, ...]:
    try:
        return tuple(str(network) for network in parse_networks(_words(values)))
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None


def _privileges(value: str | None) -> tuple[str, ...]:
    try:
        return parse_privileges(value) if value else ALL_PRIVILEGES
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None


def _endpoint(option: str) -> Callable[[str | None], str | None]:
    def checked(description: str | None) -> str | None:
        try:
            return check(description, option) if description else None
        except EndpointError as exc:
            raise SettingsError(str(exc)) from None
    return checked


def _release_patterns(values: Iterable[str]) -> tuple[str, ...]:
    patterns = tuple(_words(values))
    for pattern in patterns:
        if not re.fullmatch(r"[A-Za-z0-9.+_~*?\[\]-]+", pattern):
            raise SettingsError(f"Not a release pattern: {pattern!r} (letters, digits, "
                                ". + _ ~ - and the shell wildcards * ? [ ])")
    return patterns


def _suites(values: Iterable[str]) -> tuple[AptSuite, ...]:
    try:
        return parse_suites(values)
    except SuiteError as exc:
        raise SettingsError(f"--fetch-suites: {exc}") from None


def _architectures(values: Iterable[str]) -> tuple[str, ...]:
    try:
        return parse_architectures(values)
    except ArchitectureError as exc:
        raise SettingsError(f"--fetch-architectures: {exc}") from None


# --- the table ------------------------------------------------------------------------

#: In the order of status files, status lines and the daemon's arguments.
OPTIONS: tuple[Option, ...] = (
    Option("log", Text(), "Append the server log to this file (default: standard error).",
           variable="LOG", stock=True, manager=True, usage="--log path\t: log file of a server.",
           field="log_file", convert=absolute_path),
    Option("port", Count(0, 65535, "a port number"), "TCP port to listen on (0 picks a free one).",
           0, variable="PORT", stock=True, manager=True,
           usage="--port number\t: listening port of a server.", field="port"),
    Option("listen", Text(), "Address to listen on (default: $STAPSRV_LISTEN, else :: = "
           "every address, IPv4 included).", field="listen", convert=_or_none),
    Option("ssl", Text(), "Directory with the server certificate and key (default "
           "$SYSTEMTAP_DIR/ssl/server or ~/.systemtap/ssl/server).", variable="SSL",
           stock=True, manager=True, usage="--ssl path\t: certificate directory of a server.",
           field="ssl_dir", convert=_ssl_dir),
    Option("config", Text(), "Run every server of this stap-server global configuration file "
           "(its CONFIG_PATH/*.conf) in this process; the other server options are then not "
           "used.", scope="global"),
    Option("max-threads", Count(0), "Requests processed at once (default: number of CPUs; "
           "0 = one at a time).", variable="MAXTHREADS", stock=True, manager=True,
           usage="--max-threads n\t: requests a server processes at once.", field="max_threads"),
    Option("max-request-size", Count(1), "Largest request, uncompressed, in bytes.",
           DEFAULT_MAX_REQUEST_SIZE, variable="MAXREQSIZE", stock=True, manager=True,
           usage="--max-request-size n\t: largest uncompressed request, in bytes.",
           field="max_request_size"),
    Option("max-compressed-request", Count(1), "Largest request archive, in bytes.",
           DEFAULT_MAX_COMPRESSED_REQUEST, variable="MAXCOMPRESSEDREQ", stock=True,
           manager=True, usage="--max-compressed-request n\t: largest request archive, in bytes.",
           field="max_compressed_request"),
    Option("request-timeout", Count(0), "Seconds a client has to finish its TLS handshake and "
           "upload, and again to take its answer (0: no limit).", DEFAULT_REQUEST_SECONDS,
           variable="REQUEST_TIMEOUT", manager=True, field="request_timeout", convert=float),
    Option("compile-timeout", Count(0), "Seconds the translator may run for one request before "
           "it is stopped (0: no limit).", DEFAULT_COMPILE_SECONDS, variable="COMPILE_TIMEOUT",
           manager=True, field="compile_timeout", convert=float),
    # The four limits make one TranslatorLimits (stapsrv.config.convert).
    Option("cpu-limit", Count(1), "CPU seconds for the translator and what it runs (each "
           "process).", variable="CPU_LIMIT", manager=True),
    Option("memory-limit", Count(0), "Address space, in MiB, for the translator and each "
           "process it runs (0: no limit).", DEFAULT_MEMORY_MIB, variable="MEMORY_LIMIT",
           manager=True),
    Option("file-size-limit", Count(1), "Largest file, in MiB, the translator and what it runs "
           "may write.", variable="FILE_SIZE_LIMIT", manager=True),
    Option("process-limit", Count(1), "Processes the server's user may have while the "
           "translator runs (RLIMIT_NPROC counts them all).", variable="PROCESS_LIMIT",
           manager=True),
    Option("max-output", Count(1), "MiB of the translator's standard output, and again of its "
           "standard error, sent to the client; a translator that writes more is stopped.",
           DEFAULT_MAX_OUTPUT_MIB, variable="MAX_OUTPUT", manager=True,
           usage="--max-output MiB\t: translator output sent back, per stream (default 16).",
           field="max_output", convert=_mebibytes),
    Option("listen-backlog", Count(1), "Connections the kernel queues before the server "
           "accepts them (with --port/--listen; an --endpoint sets its own backlog=).",
           DEFAULT_LISTEN_BACKLOG, variable="LISTEN_BACKLOG", manager=True,
           usage="--listen-backlog n\t: connections queued before the server accepts them "
           "(default 1024).", field="listen_backlog"),
    Option("max-peer-connections", Count(0), "Connections one client address may hold at once "
           "(behind HAProxy, the address of the PROXY header); more are closed (default: an "
           "eighth of the open files limit, at most 1024; 0: no cap).",
           variable="MAX_PEER_CONNECTIONS", manager=True,
           usage="--max-peer-connections n\t: connections one client address may hold "
           "(default: 1/8 of the open files limit, at most 1024; 0: no cap).",
           field="max_peer_connections"),
    Option("descriptor-reserve", Count(1), "Descriptors kept free for new clients: when fewer "
           "are free, the connections waiting longest without completing a request are closed "
           "(at most a quarter of the open files limit).", DEFAULT_DESCRIPTOR_RESERVE,
           variable="DESCRIPTOR_RESERVE", manager=True,
           usage="--descriptor-reserve n\t: descriptors kept free for new clients "
           "(default 128).", field="descriptor_reserve"),
    Option("cache", Switch(), "Compile every request, even one answered before.",
           variable="CACHE", manager=True, field="cache_enabled"),
    Option("cache-dir", Text(), "Directory of the response cache (default: "
           "$SYSTEMTAP_DIR/stapsrv-cache or ~/.systemtap/stapsrv-cache).", variable="CACHE_DIR",
           manager=True, field="cache_dir", convert=absolute_path),
    Option("cache-size", Count(1), "Size cap of the response cache, in MiB (least recently used "
           "answers go first).", DEFAULT_CACHE_MIB, variable="CACHE_SIZE", manager=True,
           field="cache_size", convert=_mebibytes),
    # The fleet cache's three are checked together (stapsrv.config.convert).
    Option("fleet-cache", Text(), "redis://HOST:PORT/DB (or rediss://) of a cache shared by "
           "several servers (in front of it stays the local cache); needs --fleet-secret.",
           variable="FLEET_CACHE", manager=True, field="fleet_cache", convert=_or_none,
           shown=display_url),
    Option("fleet-secret", Text(), "File holding the fleet's secret, which authenticates fleet "
           "cache entries (make one with: python3 -m stapsrv.cli.fleet secret FILE).",
           variable="FLEET_SECRET", manager=True),
    Option("fleet-password-file", Text(), "File whose first line is the fleet Redis's password "
           "(default: $STAPSRV_FLEET_PASSWORD, else none).", variable="FLEET_PASSWORD_FILE",
           manager=True),
    Option("counters-file", Text(), "Keep the request counters (for stap-server status) in "
           "this file.", field="counters_file", convert=absolute_path),
    Option("sandbox", Switch(), "Run translators without the bubblewrap sandbox, as 4.8 does: "
           "every client's compile can then read what the server's user can.",
           variable="SANDBOX", manager=True, usage="--sandbox yes|no\t: run translators in the "
           "bubblewrap sandbox (default yes).", field="sandbox"),
    Option("allow", Words(), "Only clients at these addresses or CIDR networks (separated by "
           "commas or blanks) may use the server; repeatable (default: all).", variable="ALLOW",
           manager=True, usage="--allow networks\t: only these addresses or CIDR networks may "
           "use a server.", field="allow", convert=_networks),
    Option("refuse-guru", Flag(), "Refuse guru mode (-g) requests.", variable="REFUSE_GURU",
           manager=True, usage="--refuse-guru yes|no\t: refuse guru mode (-g) requests "
           "(default no).", field="refuse_guru"),
    Option("privileges", Text(), "Privilege levels to compile for, separated by commas "
           "(default: stapusr,stapsys,stapdev).", variable="PRIVILEGES", manager=True,
           usage="--privileges list\t: privilege levels compiled for (default "
           "stapusr,stapsys,stapdev).", field="privileges", convert=_privileges),
    Option("endpoint", Text(), "Twisted endpoint description to listen on instead of "
           "--listen/--port: tcp:PORT:interface=ADDR, haproxy:tcp:... (clients come through "
           "HAProxy with the PROXY protocol), systemd:domain=INET:index=0 (socket activation).",
           variable="ENDPOINT", manager=True, usage="--endpoint description\t: Twisted endpoint "
           "to listen on (haproxy:tcp:..., systemd:...).", field="endpoint",
           convert=_endpoint("--endpoint")),
    # Checked against the endpoint (stapsrv.config.convert).
    Option("proxy-from", Words(), "With a haproxy: --endpoint, the addresses or CIDR networks "
           "(separated by commas or blanks) of the proxies whose PROXY header is believed; a "
           "connection from anywhere else is closed unread; repeatable (default: "
           "127.0.0.0/8,::1, this host).", variable="PROXY_FROM", manager=True),
    Option("metrics", Text(), "Serve Prometheus metrics (/metrics) and a health check "
           "(/healthz) over HTTP at this endpoint, e.g. tcp:9642:interface=127.0.0.1.",
           variable="METRICS", manager=True, usage="--metrics description\t: endpoint of the "
           "Prometheus /metrics and /healthz listener.", field="metrics",
           convert=_endpoint("--metrics")),
    Option("fetch", Switch(), "Never fetch kernel releases that are not installed.",
           variable="FETCH_KERNELS", manager=True, usage="--fetch yes|no\t\t: fetch releases "
           "that are not installed (default yes).", field="fetch_kernels"),
    Option("fetch-releases", Words(), "Shell patterns (separated by commas or blanks) of the "
           "releases that may be fetched into the kernel store; repeatable (default: the "
           "flavours of the server's own kernel series and architecture, e.g. 6.1.0-*-amd64).",
           variable="FETCH_RELEASES", manager=True, usage="--fetch-releases patterns: the "
           "releases that may be fetched (default: this server's series).",
           field="fetch_patterns", convert=_release_patterns),
    # --fetch-suites (#27 item 3)
    Option("fetch-suites", Words(), "Debian suites (separated by commas or blanks; SUITE or "
           "SUITE=URI) whose kernel releases may be fetched, through a private apt "
           "configuration in the kernel store; their kernel series join the fetchable "
           "releases; repeatable (default: the machine's own apt sources and kernel series).",
           variable="FETCH_SUITES", manager=True, usage="--fetch-suites suites\t: Debian "
           "suites to fetch releases from, e.g. bookworm,trixie (default: the machine's apt "
           "sources).", field="fetch_suites", convert=_suites),
    # --fetch-architectures (#30)
    Option("fetch-architectures", Words(), "Debian architectures besides the server's own "
           "(separated by commas or blanks; arm64 on an amd64 server) whose kernel releases "
           "may be fetched, from the same suites through a private apt configuration each, "
           "and whose modules are cross-built (default: the server's own only).",
           variable="FETCH_ARCHITECTURES", manager=True, usage="--fetch-architectures "
           "arches: other architectures to build for, e.g. arm64 (default: none).",
           field="fetch_architectures", convert=_architectures),
    Option("kernel-store", Text(), "Directory of the kernel store, where releases that are not "
           "installed are fetched (default: $XDG_CACHE_HOME/stapsrv/kernels or "
           "~/.cache/stapsrv/kernels).", variable="KERNEL_STORE", manager=True,
           usage="--kernel-store path\t: where fetched releases are kept.",
           field="kernel_store", convert=absolute_path),
    Option("kernel-store-size", Count(1), "Size cap of the kernel store, in MiB (least recently "
           "used releases go first).", DEFAULT_KERNEL_STORE_MIB, variable="KERNEL_STORE_SIZE",
           manager=True, usage="--kernel-store-size MiB: size cap of the kernel store.",
           field="kernel_store_size", convert=_mebibytes),
    Option("max-fetches", Count(1), "Kernel store fetches (releases, symbols, debuginfo) run at "
           "once for all clients; more wait, client addresses in turn.", DEFAULT_MAX_FETCHES,
           variable="MAX_FETCHES", manager=True, usage="--max-fetches n\t: kernel store fetches "
           "run at once, all clients together (default 2).", field="max_fetches"),
    Option("peer-fetches", Count(0), "Kernel releases one client address may have kernel store "
           "work (fetches, symbols, debuginfo, warm-ups) under way for at once; past it a "
           "request is told so on a Server: line (0: no cap).", DEFAULT_PEER_FETCHES,
           variable="PEER_FETCHES", manager=True, usage="--peer-fetches n\t: kernel releases "
           "one client address may have kernel store work under way for (default 1; 0: no "
           "cap).", field="peer_fetches"),
    # With --fetch-debuginfo, symbols are made whatever this says (convert).
    Option("fetch-symbols", Switch(), "Do not make served releases' System.map from their "
           "kernel image (/boot/vmlinuz-*, else linux-image-*: 27-70 MB to download, 4 MB "
           "kept).", variable="FETCH_SYMBOLS", manager=True, usage="--fetch-symbols yes|no\t: "
           "make each served release's System.map from its kernel image (default yes)."),
    Option("fetch-debuginfo", Flag(), "Also keep each served release's vmlinux debuginfo "
           "(about 630 MB each), so kernel.function probes and $variables compile.",
           variable="FETCH_DEBUGINFO", manager=True, usage="--fetch-debuginfo yes|no: also its "
           "vmlinux debuginfo (default no).", field="fetch_debuginfo"),
    # --prepare-releases (#29)
    Option("prepare-releases", Flag(), "After each update of the suites' lists "
           "(--fetch-suites), fetch each new release the fetch policy allows, make its symbols "
           "and kernel configuration headers, and advertise it once ready, before any client "
           "asks; in a fleet one member does it (default: off).",
           variable="PREPARE_RELEASES", manager=True, usage="--prepare-releases yes|no: "
           "prepare new releases of the suites before clients ask (default no).",
           field="prepare_releases"),
    Option("verify-prepared", Flag(), "Also run the VM verification (kernels verify) of each "
           "release it prepares, before it is ready.", variable="VERIFY_PREPARED",
           manager=True, usage="--verify-prepared yes|no: verify prepared releases in a VM "
           "(default no).", field="verify_prepared"),
    Option("keep", Flag(), "Keep each request's temporary directory.", short="k",
           scope="global", field="keep_temporary"),
    Option("no-avahi", Flag(), "Do not advertise the server over Avahi (mDNS).", scope="global"),
)

BY_NAME = {option.name: option for option in OPTIONS}
BY_KEY = {option.key: option for option in OPTIONS}
#: The options a configuration file can set, and their variables.
FILE_OPTIONS = tuple(option for option in OPTIONS if option.variable is not None)
BY_VARIABLE = {option.variable: option for option in FILE_OPTIONS}
#: The options ``stap-server`` passes on to each server it names.
MANAGER_OPTIONS = tuple(option for option in OPTIONS if option.manager)
