"""The ``stap-server`` configuration grammar, shared by three kinds of file.

The global file (``CONFIG_PATH``, ``STAT_PATH``, ``LOG_FILE``,
``STAP_USER``), the per-server ``conf.d/*.conf`` files and the status files
in ``STAT_PATH`` are all lines of ``NAME=VALUE`` (``NAME+=VALUE`` for the
list variables).  Leading and trailing blanks are trimmed, ``#`` starts a
comment line, and the value is the rest of the line, literally: the files
are never run by a shell.  Pure functions; no I/O beyond reading one file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import evolve, field, frozen

from stapsrv.config.options import BY_VARIABLE, FILE_OPTIONS

GLOBAL_VARIABLES = ("CONFIG_PATH", "STAT_PATH", "LOG_FILE", "STAP_USER")
#: 4.8's variables for its translator options, the user and the nickname
#: (``ServerSettings`` fields); the server options' variables are in
#: ``stapsrv.config.options``.
LIST_VARIABLES = ("BUILD", "INCLUDE", "DEFINE", "RELEASE")
SCALAR_VARIABLES = ("ARCH", "USER", "NICKNAME", "RUNTIME",
                    *(option.variable for option in FILE_OPTIONS if option.variable))
#: 4.8's server option variables and the ``ServerSettings`` fields that hold them.
STOCK_FIELDS = {"LOG": "log", "PORT": "port", "SSL": "ssl", "MAXTHREADS": "max_threads",
                "MAXREQSIZE": "max_request_size", "MAXCOMPRESSEDREQ": "max_compressed_request"}

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


def _extensions(values: Mapping[str, str] | Iterable[tuple[str, str]]
                ) -> tuple[tuple[str, str], ...]:
    """Our variables with a value, in the table's order (so that equal
    settings compare equal)."""
    given = dict(values)
    unknown = set(given) - set(BY_VARIABLE) | set(given) & set(STOCK_FIELDS)
    if unknown:
        raise ValueError(f"not a variable of ours: {sorted(unknown)}")
    return tuple((option.variable, given[option.variable]) for option in FILE_OPTIONS
                 if option.variable and given.get(option.variable))


@frozen
class ServerSettings:
    """One server as a ``*.conf`` or status file describes it.  Empty strings
    mean "the default"; lists keep their order.  4.8's variables are fields;
    ours (``stapsrv.config.options``) are in ``extensions``: read any
    variable with ``get``, change one with ``with_value``."""

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
    extensions: tuple[tuple[str, str], ...] = field(default=(), converter=_extensions)

    def get(self, variable: str) -> str:
        """The value of one of the server options' variables ("" unset)."""
        if variable in STOCK_FIELDS:
            value = getattr(self, STOCK_FIELDS[variable])
            assert isinstance(value, str)
            return value
        if variable not in BY_VARIABLE:
            raise KeyError(variable)
        return dict(self.extensions).get(variable, "")

    def with_value(self, variable: str, value: str) -> ServerSettings:
        if variable in STOCK_FIELDS:
            changes: dict[str, Any] = {STOCK_FIELDS[variable]: value}  # a field named at run time
            return evolve(self, **changes)
        return evolve(self, extensions={**dict(self.extensions), variable: value})


_FIELDS = {"ARCH": "arch", "USER": "user", "BUILD": "builds", "INCLUDE": "includes",
           "DEFINE": "defines", "NICKNAME": "nickname", "RUNTIME": "runtime",
           "RELEASE": "releases"}


def settings_from(assignments: Iterable[Assignment]) -> ServerSettings:
    """Apply assignments: ``X=`` or ``X=()`` empties a list, ``X=V`` makes it
    ``[V]``, ``X+=V`` appends (nothing for an empty value or ``()``)."""
    # Field names chosen at run time: the values are str or tuple[str, ...].
    values: dict[str, Any] = {}
    variables: dict[str, str] = {}
    for assignment in assignments:
        value = assignment.value
        if assignment.name in LIST_VARIABLES:
            field = _FIELDS[assignment.name]
            current = values.get(field, ())
            assert isinstance(current, tuple)
            if value in ("", "()"):
                values[field] = current if assignment.append else ()
            else:
                values[field] = (current + (value,)) if assignment.append else (value,)
        elif assignment.name in _FIELDS:
            values[_FIELDS[assignment.name]] = value
        else:
            variables[assignment.name] = value
    settings = ServerSettings(**values)
    for variable, value in variables.items():
        settings = settings.with_value(variable, value)
    return settings


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
    lines += [f"{option.variable}={settings.get(option.variable)}"
              for option in FILE_OPTIONS
              if option.variable and (option.stock or settings.get(option.variable))]
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"a status value cannot hold a line break: {line!r}")
    return "".join(line + "\n" for line in lines)
