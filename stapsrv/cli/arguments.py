"""The ``stap-server`` command line: ``stap-server ACTION [OPTION ...]``.

Options of the *spec* class (``-a -r -i -I -R -B -D -u -n -p``) describe a
server.  Unlike 4.8, which could name at most one server, every ``-n`` or
``-p`` after the first begins another server, so one command line can name
several; the *distributed* options (``--log --port --ssl --max-threads
--max-request-size --max-compressed-request``) are handed to those servers
in order.  ``--opt=value`` and attached short values are accepted too.
"""

from __future__ import annotations

from pathlib import Path

from attrs import define, field

from stapsrv.config.options import MANAGER_OPTIONS

ACTIONS = ("start", "stop", "restart", "condrestart", "try-restart", "force-reload",
           "status", "reload", "usage")

_SHORT_WITH_VALUE = set("aBcDIn pru".replace(" ", "") + "R")
_SHORT_FLAGS = set("ikP")
#: The options handed to the named servers in order (``stapsrv.config.options``).
DISTRIBUTED = tuple(option.name for option in MANAGER_OPTIONS)


class ArgumentError(Exception):
    """A word of the command line that is not an option we know."""


@define
class SpecWords:
    """The spec options that describe one server, as given."""

    nickname: str | None = None
    pid: str | None = None
    changes: list[tuple[str, str]] = field(factory=list)  # (flag, value) after -n/-p


@define
class Invocation:
    action: str
    specs: list[SpecWords] = field(factory=list)
    distributed: dict[str, list[str]] = field(factory=lambda: {k: [] for k in DISTRIBUTED})
    config_files: list[Path] = field(factory=list)
    keep: bool = False
    password: bool = False
    #: ``status --json``: one JSON document instead of the lines.
    json: bool = False

    @property
    def explicit(self) -> bool:
        return bool(self.specs)


def parse(words: list[str]) -> Invocation:
    """Parse the words after the action.  Raises ArgumentError."""
    if not words:
        raise ArgumentError("")
    invocation = Invocation(words[0])
    rest = _Words(words, 1)
    while rest.index < len(words):
        word = rest.next()
        if word == "--":
            continue
        if word == "--json":
            invocation.json = True
        elif word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name not in DISTRIBUTED:
                raise ArgumentError(word)
            invocation.distributed[name].append(value if eq else rest.value(word))
        else:
            _short(word, rest, invocation)
    return invocation


@define
class _Words:
    """The words still to read."""

    words: list[str]
    index: int

    def next(self) -> str:
        self.index += 1
        return self.words[self.index - 1]

    def value(self, option: str) -> str:
        """The next word, the value of ``option``."""
        if self.index >= len(self.words):
            raise ArgumentError(option)
        return self.next()


def _short(word: str, rest: _Words, invocation: Invocation) -> None:
    """A short option (``-k``, ``-a x86_64``, ``-ax86_64``)."""
    if len(word) < 2 or not word.startswith("-"):
        raise ArgumentError(word)
    letter = word[1]
    if letter in _SHORT_FLAGS and len(word) == 2:
        if letter == "i":
            _spec_option(invocation, "-i", "")
        elif letter == "k":
            invocation.keep = True
        else:
            invocation.password = True
        return
    if letter not in _SHORT_WITH_VALUE:
        raise ArgumentError(word)
    value = word[2:] or rest.value(word)
    if letter == "c":
        invocation.config_files = [Path(value).absolute()]
    else:
        _spec_option(invocation, "-" + letter, value)


def _spec_option(invocation: Invocation, flag: str, value: str) -> None:
    """A spec option: ``-n`` and ``-p`` name a server (each after the first
    names another); the others change the server named last."""
    current = invocation.specs[-1] if invocation.specs else None
    if flag in ("-n", "-p"):
        if current is None or current.nickname is not None or current.pid is not None:
            current = SpecWords()
            invocation.specs.append(current)
        if flag == "-n":
            current.nickname = value
        else:
            current.pid = value
        return
    if current is None:
        current = SpecWords()
        invocation.specs.append(current)
    current.changes.append((flag, value))
