"""What the small members of a request say (pure: bytes in, values out).

The member names and formats are those a 4.8 client writes: ``version``,
``sysinfo``, ``argv1``..``argvN``, ``locale`` and, for Secure Boot clients,
``mok_fingerprints``.  A member that is missing (or is not a file) reads
as ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from attrs import frozen

#: What a client that sends no ``version`` file is assumed to speak.
OLDEST_PROTOCOL = "1.0"
#: From this protocol version on, clients send locale and MOK information.
LOCALE_PROTOCOL = "1.6"

#: The locale variables a client may forward, and the values we accept.
LOCALE_NAMES = frozenset(
    {"LANG", "LC_ALL", "LC_COLLATE", "LC_CTYPE", "LC_MESSAGES", "LC_MONETARY",
     "LC_NUMERIC", "LC_TIME"}
)
_LOCALE_VALUE = re.compile(rb"[a-zA-Z0-9@_.=-]*")


_ULONG_MAX = 2**64 - 1


def version_key(version: str) -> tuple[int, ...]:
    """Order protocol versions as 4.8 does: dotted numbers, prefix is smaller.

    Each component counts only its leading digits (``strtoul`` semantics), so
    ``4.8a`` compares like ``4.8``.
    """
    key = []
    for component in version.split("."):
        digits = re.match(r"\d*", component)
        raw = digits.group() if digits else ""
        # strtoul saturates; so does this (and no huge int is ever built).
        significant = raw.lstrip("0")[:21] or "0"
        key.append(min(int(significant), _ULONG_MAX))
    return tuple(key)


def client_version(data: bytes | None) -> str:
    """The protocol version a client speaks, from its ``version`` member."""
    if data is None:
        return OLDEST_PROTOCOL
    tokens = data.decode("utf-8", "replace").split()
    return tokens[0] if tokens else OLDEST_PROTOCOL


def speaks_locale(version: str) -> bool:
    """Whether a client of ``version`` sends locale and MOK information (and
    expects ``uprobes.ko`` in the module directory only)."""
    return version_key(version) >= version_key(LOCALE_PROTOCOL)


def target_release(data: bytes | None) -> str | None:
    """The kernel release from ``sysinfo: <release> <arch>``; None if unreadable."""
    if data is None:
        return None
    tokens = data.decode("utf-8", "replace").split()
    if len(tokens) < 2:
        return None
    return tokens[1]


def target_architecture(data: bytes | None) -> str | None:
    """The architecture from ``sysinfo: <release> <arch>`` (the
    translator's name: ``x86_64``, ``arm64``); None if unreadable."""
    if data is None:
        return None
    tokens = data.decode("utf-8", "replace").split()
    return tokens[2] if len(tokens) >= 3 else None


def arguments(member: Callable[[str], bytes | None]) -> list[bytes]:
    """``argv1``, ``argv2``, ... (``member(name)`` reads one) up to the first
    missing one.

    Each argument is cut at an embedded NUL, as the C server reads them as
    C strings.
    """
    arguments: list[bytes] = []
    index = 1
    while True:
        data = member(f"argv{index}")
        if data is None:
            return arguments
        arguments.append(data.split(b"\0", 1)[0])
        index += 1


@frozen
class LocaleResult:
    """Accepted locale variables and the ``Server:`` lines for the client."""

    variables: dict[str, str]
    complaints: tuple[str, ...]


def filter_locale(data: bytes) -> LocaleResult:
    """Keep well-formed ``NAME=value`` lines for the eight locale variables.

    A line without a terminating newline is ignored, as by 4.8.  Everything
    else that is rejected produces one message for the client's stderr.
    """
    variables: dict[str, str] = {}
    complaints: list[str] = []
    lines = data.split(b"\n")
    for line in lines[:-1]:
        text = line.decode("utf-8", "replace")
        name, sep, value = line.partition(b"=")
        if not sep:
            complaints.append(f"Server: Localization key=value line '{text}' cannot be parsed")
            continue
        name_text = name.decode("utf-8", "replace")
        if name_text not in LOCALE_NAMES:
            complaints.append(f"Server: Localization key '{name_text}' not found in global list")
            continue
        if not _LOCALE_VALUE.fullmatch(value):
            complaints.append(
                "Server: Localization value '{}' contains illegal characters".format(
                    value.decode("utf-8", "replace"))
            )
            continue
        variables[name_text] = value.decode("ascii")
    return LocaleResult(variables, tuple(complaints))
