"""The ``stap-server`` configuration grammar, shared by three kinds of file.

The global file (``CONFIG_PATH``, ``STAT_PATH``, ``LOG_FILE``,
``STAP_USER``), the per-server ``conf.d/*.conf`` files and the status files
in ``STAT_PATH`` are all lines of ``NAME=VALUE`` (``NAME+=VALUE`` for the
list variables).  Leading and trailing blanks are trimmed, ``#`` starts a
comment line, and the value is the rest of the line, literally: the files
are never run by a shell.  Pure functions; no I/O beyond reading one file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attrs import evolve, frozen

GLOBAL_VARIABLES = ("CONFIG_PATH", "STAT_PATH", "LOG_FILE", "STAP_USER")
LIST_VARIABLES = ("BUILD", "INCLUDE", "DEFINE", "RELEASE")
#: Variables of ours (not in 4.8): (variable, settings field, daemon option).
EXTENSIONS = (
    ("REQUEST_TIMEOUT", "request_timeout", "request-timeout"),
    ("COMPILE_TIMEOUT", "compile_timeout", "compile-timeout"),
    ("CPU_LIMIT", "cpu_limit", "cpu-limit"),
    ("MEMORY_LIMIT", "memory_limit", "memory-limit"),
    ("FILE_SIZE_LIMIT", "file_size_limit", "file-size-limit"),
    ("PROCESS_LIMIT", "process_limit", "process-limit"),
    ("MAX_OUTPUT", "max_output", "max-output"),
    ("LISTEN_BACKLOG", "listen_backlog", "listen-backlog"),
    ("MAX_PEER_CONNECTIONS", "max_peer_connections", "max-peer-connections"),
    ("DESCRIPTOR_RESERVE", "descriptor_reserve", "descriptor-reserve"),
    ("CACHE", "cache", "cache"),
    ("CACHE_DIR", "cache_dir", "cache-dir"),
    ("CACHE_SIZE", "cache_size", "cache-size"),
    ("FLEET_CACHE", "fleet_cache", "fleet-cache"),
    ("FLEET_SECRET", "fleet_secret", "fleet-secret"),
    ("FLEET_PASSWORD_FILE", "fleet_password_file", "fleet-password-file"),
    ("SANDBOX", "sandbox", "sandbox"),
    ("ALLOW", "allow", "allow"),
    ("REFUSE_GURU", "refuse_guru", "refuse-guru"),
    ("PRIVILEGES", "privileges", "privileges"),
    ("ENDPOINT", "endpoint", "endpoint"),
    ("PROXY_FROM", "proxy_from", "proxy-from"),
    ("METRICS", "metrics", "metrics"),
    ("FETCH_KERNELS", "fetch_kernels", "fetch"),
    ("FETCH_RELEASES", "fetch_releases", "fetch-releases"),
    ("KERNEL_STORE", "kernel_store", "kernel-store"),
    ("KERNEL_STORE_SIZE", "kernel_store_size", "kernel-store-size"),
    ("MAX_FETCHES", "max_fetches", "max-fetches"),
    ("PEER_FETCHES", "peer_fetches", "peer-fetches"),
    ("FETCH_SYMBOLS", "fetch_symbols", "fetch-symbols"),
    ("FETCH_DEBUGINFO", "fetch_debuginfo", "fetch-debuginfo"),
)
#: Of those, the yes/no switches: ``no`` becomes the daemon's ``--no-...``
#: for these, ``yes`` its ``--...`` flag for the others.
SWITCHES = ("cache", "sandbox", "fetch", "fetch-symbols")
FLAGS = ("refuse-guru", "fetch-debuginfo")
#: The values that mean "no" and "yes" for a switch.
SWITCH_NO = ("no", "off", "0", "false")
SWITCH_YES = ("", "yes", "on", "1", "true")
SCALAR_VARIABLES = ("ARCH", "USER", "NICKNAME", "RUNTIME", "LOG", "PORT", "SSL",
                    "MAXTHREADS", "MAXREQSIZE", "MAXCOMPRESSEDREQ",
                    *(name for name, _, _ in EXTENSIONS))

DEFAULT_GLOBAL_FILE = Path("/etc/sysconfig/stap-server")
DEBIAN_GLOBAL_FILE = Path("/etc/default/stap-server")


class ConfigError(Exception):
    """A line that is not part of the grammar; the message names the place."""

    def __init__(self, path: Path | str, line_number: int, line: str) -> None:
        super().__init__(f'Invalid input, "{line}", in {path} (line {line_number})')
        self.path = path
        self.line_number = line_number
        self.line = line


@frozen
class Assignment:
    name: str
    append: bool
    value: str


def parse(text: str, path: Path | str, scalars: Iterable[str],
          lists: Iterable[str] = ()) -> list[Assignment]:
    """Every assignment in ``text``, in order.

    A last line without a newline counts (4.8 dropped it).
    """
    scalar_names = frozenset(scalars)
    list_names = frozenset(lists)
    assignments = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(path, number, line)
        append = name.endswith("+")
        if append:
            name = name[:-1]
        known = name in list_names or (name in scalar_names and not append)
        if not known:
            raise ConfigError(path, number, line)
        assignments.append(Assignment(name, append, value))
    return assignments


def read(path: Path, scalars: Iterable[str], lists: Iterable[str] = ()) -> list[Assignment]:
    return parse(path.read_text(encoding="utf-8", errors="surrogateescape"), path,
                 scalars, lists)


@frozen
class GlobalConfig:
    config_path: Path = Path("/etc/stap-server/conf.d")
    stat_path: Path = Path("/run/stap-server")
    log_file: Path = Path("/var/log/stap-server/log")
    stap_user: str | None = None


def read_global(files: Iterable[Path], environ: dict[str, str]) -> GlobalConfig:
    """Built-in defaults, ``STAP_USER`` from the environment, then each
    existing file in turn; an empty value leaves a variable unchanged."""
    config = GlobalConfig(stap_user=environ.get("STAP_USER") or None)
    for path in files:
        if not path.is_file():
            continue
        for assignment in read(path, GLOBAL_VARIABLES):
            name, value = assignment.name, assignment.value
            if not value:
                continue
            if name == "CONFIG_PATH":
                config = evolve(config, config_path=Path(value))
            elif name == "STAT_PATH":
                config = evolve(config, stat_path=Path(value))
            elif name == "LOG_FILE":
                config = evolve(config, log_file=Path(value))
            else:
                config = evolve(config, stap_user=value)
    return config


@frozen
class ServerSettings:
    """One server as a ``*.conf`` or status file describes it.  Empty strings
    mean "the default"; lists keep their order."""

    arch: str = ""
    user: str = ""
    builds: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    defines: tuple[str, ...] = ()
    nickname: str = ""
    runtime: str = ""
    releases: tuple[str, ...] = ()
    log: str = ""
    port: str = ""
    ssl: str = ""
    max_threads: str = ""
    max_request_size: str = ""
    max_compressed_request: str = ""
    request_timeout: str = ""
    compile_timeout: str = ""
    cpu_limit: str = ""
    memory_limit: str = ""
    file_size_limit: str = ""
    process_limit: str = ""
    max_output: str = ""
    listen_backlog: str = ""
    max_peer_connections: str = ""
    descriptor_reserve: str = ""
    cache: str = ""
    cache_dir: str = ""
    cache_size: str = ""
    fleet_cache: str = ""
    fleet_secret: str = ""
    fleet_password_file: str = ""
    sandbox: str = ""
    allow: str = ""
    refuse_guru: str = ""
    privileges: str = ""
    endpoint: str = ""
    proxy_from: str = ""
    metrics: str = ""
    fetch_kernels: str = ""
    fetch_releases: str = ""
    kernel_store: str = ""
    kernel_store_size: str = ""
    max_fetches: str = ""
    peer_fetches: str = ""
    fetch_symbols: str = ""
    fetch_debuginfo: str = ""


_FIELDS = {name: field for name, field, _ in EXTENSIONS}
_FIELDS |= {"ARCH": "arch", "USER": "user", "BUILD": "builds", "INCLUDE": "includes",
           "DEFINE": "defines", "NICKNAME": "nickname", "RUNTIME": "runtime",
           "RELEASE": "releases", "LOG": "log", "PORT": "port", "SSL": "ssl",
           "MAXTHREADS": "max_threads", "MAXREQSIZE": "max_request_size",
           "MAXCOMPRESSEDREQ": "max_compressed_request"}


def settings_from(assignments: Iterable[Assignment]) -> ServerSettings:
    """Apply assignments: ``X=`` or ``X=()`` empties a list, ``X=V`` makes it
    ``[V]``, ``X+=V`` appends (nothing for an empty value or ``()``)."""
    # Field names chosen at run time: the values are str or tuple[str, ...].
    values: dict[str, Any] = {}
    for assignment in assignments:
        field = _FIELDS[assignment.name]
        value = assignment.value
        if assignment.name in LIST_VARIABLES:
            current = values.get(field, ())
            assert isinstance(current, tuple)
            if value in ("", "()"):
                values[field] = current if assignment.append else ()
            else:
                values[field] = (current + (value,)) if assignment.append else (value,)
        else:
            values[field] = value
    return ServerSettings(**values)


def read_server_file(path: Path) -> ServerSettings:
    return settings_from(read(path, SCALAR_VARIABLES, LIST_VARIABLES))


def configured_settings(global_config: GlobalConfig) -> list[tuple[Path, ServerSettings]]:
    """Every ``CONFIG_PATH/*.conf`` file (in name order) and what it says."""
    try:
        paths = sorted(p for p in global_config.config_path.glob("*.conf") if p.is_file())
    except OSError:
        return []
    return [(path, read_server_file(path)) for path in paths]


def render_status(settings: ServerSettings) -> str:
    """A status file in 4.8's order (read back with ``read_server_file``)."""
    lines = [f"ARCH={settings.arch}", f"USER={settings.user}"]
    lines += [f"BUILD+={value}" for value in settings.builds]
    lines += [f"INCLUDE+={value}" for value in settings.includes]
    lines += [f"DEFINE+={value}" for value in settings.defines]
    lines += [f"NICKNAME={settings.nickname}", f"RUNTIME={settings.runtime}"]
    lines += [f"RELEASE+={value}" for value in settings.releases]
    lines += [f"LOG={settings.log}", f"PORT={settings.port}", f"SSL={settings.ssl}",
              f"MAXTHREADS={settings.max_threads}",
              f"MAXREQSIZE={settings.max_request_size}",
              f"MAXCOMPRESSEDREQ={settings.max_compressed_request}"]
    lines += [f"{name}={getattr(settings, field)}" for name, field, _ in EXTENSIONS
              if getattr(settings, field)]
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"a status value cannot hold a line break: {line!r}")
    return "".join(line + "\n" for line in lines)
