"""Which server paths a SystemTap script names, read the way the translator
reads its text (sans-IO).

The translator reads a server file when a string literal names it: a
``process("/usr/bin/x")`` or ``.library(...)`` probe point, the module
argument of ``@cast`` and ``@var`` (a path, a ``:``-separated list of
them, or a header ``<linux/sched.h>`` / ``kernel<linux/sched.h>``), a
``module("/path/x.ko")`` probe point.  The lexer joins adjacent string
literals at parse time (``"/usr/" "bin/ls"`` is ``"/usr/bin/ls"``, also
across a macro: ``@P "ls"``); ``.`` between literals is a run-time
operator that probe points and ``@cast`` do not accept.

:func:`scan_script` lists the absolute paths a text names (generously:
any literal that looks like one) and says why the text cannot be
fingerprinted when a path comes from something a key cannot follow:

* a header form ``<...>``: the compiler reads it and everything it
  includes, from the include path;
* a relative ``process``/``library`` name (the translator looks it up in
  ``PATH`` or the loader's directories), or one built from ``@1``/``$1``
  or a macro;
* a path literal next to a macro, an argument or a preprocessor
  conditional (the joined literal is known only after preprocessing);
* a glob (``process("/usr/bin/*")``) or a backslash escape in a path;
* ``#include`` in embedded C.
"""

from __future__ import annotations

import re

from attrs import frozen

#: A path literal longer than this is not a path any translator opens.
MAX_PATH = 4096

#: Probe point functions whose argument is a file the translator opens.
_FILE_POINTS = ("process", "library")
_GLOB = re.compile(r"[*?\[]")
_HEADER = re.compile(r"<[^<>]*>")
_INCLUDE = re.compile(rb"#\s*include\b")


@frozen
class ScriptPaths:
    """What a script text names: absolute paths, and the reason it cannot
    be fingerprinted (None when it can)."""

    paths: tuple[str, ...]
    uncacheable: str | None = None
    #: Kernel modules named by ``module("name")`` probe points (a plain
    #: name, not a path or a glob): their debuginfo may be fetched.
    modules: tuple[str, ...] = ()


@frozen
class _Token:
    #: "string", "word" (an identifier, possibly with a leading ``@``/``$``),
    #: "pp" (``%(``, ``%?``, ``%:``, ``%)``), "embedded" (``%{ ... %}``) or
    #: "op" (any other character).
    kind: str
    text: str


def _tokens(text: str) -> list[_Token]:
    """The tokens that matter here; comments and whitespace dropped."""
    tokens: list[_Token] = []
    i, end = 0, len(text)
    while i < end:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#" or text.startswith("//", i):
            newline = text.find("\n", i)
            i = end if newline < 0 else newline + 1
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = end if close < 0 else close + 2
        elif text.startswith("%{", i):
            close = text.find("%}", i + 2)
            stop = end if close < 0 else close + 2
            tokens.append(_Token("embedded", text[i:stop]))
            i = stop
        elif c == "%" and i + 1 < end and text[i + 1] in "(?:)":
            tokens.append(_Token("pp", text[i:i + 2]))
            i += 2
        elif c == '"':
            j = i + 1
            value = []
            while j < end and text[j] != '"':
                if text[j] == "\\" and j + 1 < end:
                    value.append(text[j:j + 2])
                    j += 2
                    continue
                value.append(text[j])
                j += 1
            tokens.append(_Token("string", "".join(value)))
            i = j + 1
        elif c.isalnum() or c in "_@$":
            j = i + 1
            while j < end and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(_Token("word", text[i:j]))
            i = j
        else:
            tokens.append(_Token("op", c))
            i += 1
    return tokens


def _joined(tokens: list[_Token]) -> list[tuple[int, int, str]]:
    """Runs of adjacent string literals: (first index, last index, value)."""
    runs: list[tuple[int, int, str]] = []
    index = 0
    while index < len(tokens):
        if tokens[index].kind != "string":
            index += 1
            continue
        first = index
        while index + 1 < len(tokens) and tokens[index + 1].kind == "string":
            index += 1
        runs.append((first, index, "".join(t.text for t in tokens[first:index + 1])))
        index += 1
    return runs


def _expands(token: _Token | None) -> bool:
    """Whether a token next to a literal can join more text to it."""
    if token is None:
        return False
    return token.kind == "pp" or (token.kind == "word" and token.text[0] in "@$")


def _path_parts(value: str) -> list[str]:
    """The parts of a literal that may be paths: ``@cast``/``@var`` take a
    ``:``-separated list of modules."""
    return [part for part in value.split(":") if part]


def scan_script(data: bytes) -> ScriptPaths:
    text = data.decode("utf-8", "surrogateescape")
    tokens = _tokens(text)
    paths: set[str] = set()
    reason: str | None = None

    def refuse(why: str) -> None:
        nonlocal reason
        if reason is None:
            reason = why

    for token in tokens:
        if token.kind == "embedded" and _INCLUDE.search(token.text.encode(
                "utf-8", "surrogateescape")):
            refuse("#include in embedded C")
    for first, last, value in _joined(tokens):
        before = tokens[first - 1] if first > 0 else None
        after = tokens[last + 1] if last + 1 < len(tokens) else None
        pathlike = "/" in value or "<" in value
        if pathlike and (_expands(before) or _expands(after)):
            refuse(f"a path literal joined by the preprocessor: {value[:80]!r}")
        if _HEADER.search(value):
            refuse(f"a header form: {value[:80]!r}")
        for part in _path_parts(value):
            if not part.startswith("/") or len(part) > MAX_PATH:
                continue
            if "\\" in part:
                refuse(f"an escape in a path: {part[:80]!r}")
            elif _GLOB.search(part):
                refuse(f"a glob: {part[:80]!r}")
            elif "\0" not in part:
                paths.add(part)
    # process("...") and .library("..."): the argument must be one absolute
    # literal; anything else is looked up where the key cannot follow.
    for index, token in enumerate(tokens[:-1]):
        if token.kind != "word" or token.text not in _FILE_POINTS:
            continue
        if tokens[index + 1].text != "(":
            continue
        argument = tokens[index + 2:index + 3]
        if not argument or argument[0].text == ")":
            continue
        if argument[0].kind != "string":
            refuse(f"{token.text}() names a file through {argument[0].text[:40]!r}")
        elif not argument[0].text.startswith("/"):
            refuse(f"{token.text}() names a file by a relative name: "
                   f"{argument[0].text[:80]!r}")
    return ScriptPaths(tuple(sorted(paths)), reason, module_names(tokens))


#: What a module name in ``module("...")`` may be to be fetched.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def module_names(tokens: list[_Token]) -> tuple[str, ...]:
    """The plain names of ``module("name")`` probe points (one literal
    argument; paths, globs and joined literals are left out)."""
    names = set()
    for index, token in enumerate(tokens[:-3]):
        if token.kind != "word" or token.text != "module" or tokens[index + 1].text != "(":
            continue
        argument, close = tokens[index + 2], tokens[index + 3]
        if (argument.kind == "string" and close.kind == "op" and close.text == ")"
                and _MODULE_NAME.fullmatch(argument.text)):
            names.add(argument.text)
    return tuple(sorted(names))
