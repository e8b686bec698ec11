"""The translator command line: building it and reading it as stap would.

The server runs ``stap -r<release> <server options> --tmpdir=<dir>
--client-options <client arguments>``.  Option policy is left to the
translator (``--client-options`` makes it refuse dangerous options); the
server itself only needs to know which privilege a request asks for and to
drop a client-supplied ``--sign-module``, and for both it must read the
arguments exactly as stap's GNU ``getopt_long`` does.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from attrs import frozen

#: stap 4.8's short options (``cmdline.h``).
SHORT_OPTIONS = "hVvtp:I:e:E:o:R:r:a:m:kgPc:x:D:bs:uqiwl:d:L:FS:B:J:jWG:T:"


class Arg(enum.Enum):
    NONE = 0
    REQUIRED = 1
    OPTIONAL = 2


#: stap 4.8's long options and whether they take an argument (``cmdline.cxx``).
LONG_OPTIONS: dict[str, Arg] = {
    "skip-badvars": Arg.NONE, "vp": Arg.REQUIRED, "unprivileged": Arg.NONE,
    "client-options": Arg.NONE, "help": Arg.NONE, "disable-cache": Arg.NONE,
    "poison-cache": Arg.NONE, "clean-cache": Arg.NONE, "compatible": Arg.REQUIRED,
    "ldd": Arg.NONE, "use-server": Arg.OPTIONAL, "list-servers": Arg.OPTIONAL,
    "trust-servers": Arg.OPTIONAL, "use-server-on-error": Arg.OPTIONAL,
    "use-http-server": Arg.REQUIRED, "all-modules": Arg.NONE,
    "sign-module": Arg.OPTIONAL, "remote": Arg.REQUIRED, "remote-prefix": Arg.NONE,
    "check-version": Arg.NONE, "version": Arg.NONE, "tmpdir": Arg.REQUIRED,
    "download-debuginfo": Arg.OPTIONAL, "dump-probe-types": Arg.NONE,
    "dump-probe-aliases": Arg.NONE, "dump-functions": Arg.NONE,
    "privilege": Arg.REQUIRED, "suppress-handler-errors": Arg.NONE,
    "modinfo": Arg.REQUIRED, "rlimit-as": Arg.REQUIRED, "rlimit-cpu": Arg.REQUIRED,
    "rlimit-nproc": Arg.REQUIRED, "rlimit-stack": Arg.REQUIRED,
    "rlimit-fsize": Arg.REQUIRED, "sysroot": Arg.REQUIRED, "sysenv": Arg.REQUIRED,
    "suppress-time-limits": Arg.NONE, "runtime": Arg.REQUIRED, "dyninst": Arg.NONE,
    "bpf": Arg.NONE, "benchmark-sdt": Arg.NONE, "benchmark-sdt-loops": Arg.REQUIRED,
    "benchmark-sdt-threads": Arg.REQUIRED, "color": Arg.OPTIONAL,
    "colour": Arg.OPTIONAL, "prologue-searching": Arg.OPTIONAL,
    "save-uprobes": Arg.NONE, "target-namespaces": Arg.REQUIRED,
    "monitor": Arg.OPTIONAL, "interactive": Arg.NONE, "example": Arg.NONE,
    "no-global-var-display": Arg.NONE,
}

# Options that glibc treats as one when an abbreviation matches several names.
_SAME_OPTION = {"colour": "color"}


def _short_table(spec: str) -> dict[str, bool]:
    table: dict[str, bool] = {}
    for index, char in enumerate(spec):
        if char != ":":
            table[char] = spec[index + 1: index + 2] == ":"
    return table


_SHORT = _short_table(SHORT_OPTIONS)


@frozen
class Option:
    """One option occurrence: its name (``"p"`` or ``"privilege"``), value and
    the slice ``[start, stop)`` of argv items it occupies."""

    name: str | None
    value: str | None
    start: int
    stop: int


def _resolve_long(name: str) -> str | None:
    if name in LONG_OPTIONS:
        return name
    matches = {_SAME_OPTION.get(n, n) for n in LONG_OPTIONS if n.startswith(name)}
    if len(matches) == 1:
        return matches.pop()
    return None  # unknown or ambiguous: getopt reports '?'


def scan_options(argv: Sequence[str]) -> list[Option]:
    """Every option in ``argv`` (no program name), in order, GNU style.

    Non-option words are skipped (GNU permutes them to the end), ``--`` ends
    option processing, and an option's argument may be the next word.  An
    unknown or ambiguous option yields ``name=None``.
    """
    options: list[Option] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            break
        if word.startswith("--"):
            option = _long_option(argv, index)
            options.append(option)
            index = option.stop
        elif word.startswith("-") and word != "-":
            found = _short_options(argv, index)
            options += found
            index = max(index + 1, found[-1].stop)
        else:
            index += 1
    return options


def _long_option(argv: Sequence[str], index: int) -> Option:
    """The ``--name[=value]`` option at ``argv[index]`` (with its value)."""
    name, eq, inline = argv[index][2:].partition("=")
    resolved = _resolve_long(name)
    if resolved is None:
        return Option(None, None, index, index + 1)
    kind = LONG_OPTIONS[resolved]
    if kind is Arg.NONE and eq:
        # getopt_long refuses a value for an option that takes none.
        return Option(None, None, index, index + 1)
    if kind is Arg.NONE:
        return Option(resolved, None, index, index + 1)
    if eq:
        return Option(resolved, inline, index, index + 1)
    if kind is Arg.REQUIRED and index + 1 < len(argv):
        return Option(resolved, argv[index + 1], index, index + 2)
    if kind is Arg.REQUIRED:
        return Option(None, None, index, index + 1)
    return Option(resolved, None, index, index + 1)


def _short_options(argv: Sequence[str], index: int) -> list[Option]:
    """The bundled short options of ``argv[index]`` (``-vvp4``), the last
    perhaps taking the next word as its value."""
    word = argv[index]
    options: list[Option] = []
    start, stop = index, index + 1
    for position in range(1, len(word)):
        char = word[position]
        takes_value = _SHORT.get(char)
        if takes_value is None:
            options.append(Option(None, None, start, stop))
            continue
        if not takes_value:
            options.append(Option(char, None, start, stop))
            continue
        rest = word[position + 1:]
        if rest:
            options.append(Option(char, rest, start, stop))
        elif stop < len(argv):
            options.append(Option(char, argv[stop], start, stop + 1))
        else:
            options.append(Option(None, None, start, stop))
        break
    return options


class Privilege(enum.IntEnum):
    """``privilege.h`` values."""

    STAPUSR = 2
    STAPSYS = 4
    STAPDEV = 8


PRIVILEGE_NAMES = {"stapusr": Privilege.STAPUSR, "stapsys": Privilege.STAPSYS,
                   "stapdev": Privilege.STAPDEV}
#: Every level, least privileged first.
ALL_PRIVILEGES = tuple(PRIVILEGE_NAMES)


@frozen
class PrivilegeResult:
    privilege: Privilege
    invalid_value: str | None = None


def requested_privilege(argv: Sequence[str]) -> PrivilegeResult:
    """The privilege a translator command line asks for (stapdev by default).

    The first ``--privilege=X`` or ``--unprivileged`` decides.  An unknown
    value counts as stapdev and is reported so it can be logged.
    """
    for option in scan_options(argv):
        if option.name == "privilege":
            value = option.value or ""
            known = PRIVILEGE_NAMES.get(value)
            if known is None:
                return PrivilegeResult(Privilege.STAPDEV, value)
            return PrivilegeResult(known)
        if option.name == "unprivileged":
            return PrivilegeResult(Privilege.STAPUSR)
    return PrivilegeResult(Privilege.STAPDEV)


def guru_mode(argv: Sequence[str]) -> bool:
    """Whether a translator command line asks for guru mode (``-g``)."""
    return any(option.name == "g" for option in scan_options(argv))


def without_sign_module(arguments: Sequence[str]) -> list[str]:
    """Client arguments minus any ``--sign-module`` (only the server may sign)."""
    drop: set[int] = set()
    for option in scan_options(arguments):
        if option.name == "sign-module":
            drop.update(range(option.start, option.stop))
    return [word for index, word in enumerate(arguments) if index not in drop]


def without_release(arguments: Sequence[str], release: str) -> list[str]:
    """Client arguments without their ``-r <release>``, for a build tree the
    server names itself (a stored release: the translator takes only a
    plain release name from the client, and the client's ``-r``, coming
    after the server's, would win).  Options clustered with it (``-vr R``)
    are kept."""
    words: list[str | None] = list(arguments)
    for option in scan_options(arguments):
        if option.name != "r" or option.value != release:
            continue
        word = arguments[option.start]
        if option.stop - option.start == 2:
            words[option.stop - 1] = None
            kept = word[:-1]
        else:
            kept = word[:len(word) - len(release) - 1]
        words[option.start] = kept if kept != "-" else None
    return [word for word in words if word is not None]


@frozen
class ServerOption:
    """One of the server's own translator options, in command-line order."""

    flag: str   # "-a", "-B", "-D", "-I", "-R", or "-k" (no value)
    value: str = ""

    def words(self) -> list[str]:
        if self.flag == "-a":
            return ["-a", self.value]
        if self.flag == "-k":
            return ["-k"]
        if not self.value:
            # "-B" alone would take the next word (--tmpdir=...) as its value.
            return [self.flag, ""]
        return [self.flag + self.value]


def translator_argv(
    stap: str,
    release: str,
    server_options: Iterable[ServerOption],
    tmpdir: str,
    client_arguments: Sequence[str],
) -> list[str]:
    """``stap -r<release> <server options> --tmpdir=... --client-options ...``.

    Each server option stays one argument: unlike 4.8, which re-split them
    with shell word expansion, a value with a space is passed intact.
    """
    argv = [stap, "-r" + release]
    for option in server_options:
        argv.extend(option.words())
    argv.append("--tmpdir=" + tmpdir)
    argv.append("--client-options")
    argv.extend(without_sign_module(client_arguments))
    return argv
