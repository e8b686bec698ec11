"""Client text made safe for a log line.

Whatever a client sends (arguments, its version, member names, paths) may
hold newlines, carriage returns, escape sequences and other control
characters: written as they are, they would forge log lines or drive an
admin's terminal.  Each control character becomes a visible escape
(``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u2028``); everything else,
backslashes included, is kept, so ordinary text reads as it did.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: C0, DEL, C1, and the Unicode line and paragraph separators; lone
#: surrogates (undecodable bytes kept by ``surrogateescape``) too.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` without control characters: see the module's description."""
    return _CONTROL.sub(_escape, text)


#: The lines of a traceback that stand at the left margin.
_TRACEBACK_HEAD = "Traceback (most recent call last):"


def escape_traceback(traceback: str, message: str) -> str:
    """A traceback for the log, escaped like the rest of its line.

    ``message`` is its exception's ``type: value`` line as the traceback
    ends with it; the value may be a client's text, newlines included, so
    it becomes one escaped line.  Every other line has its control
    characters escaped too, and any line that would stand at the left
    margin other than the traceback's head and that message is indented,
    so nothing in it can pass for a log line of its own.
    """
    text = traceback.rstrip("\n")
    message = message.rstrip("\n")
    before, found, after = text.rpartition(message)
    lines: list[str] = []

    def add(line: str, margin: bool = False) -> None:
        line = escape_controls(line)
        if line[:1] and not line[:1].isspace() and not margin and line != _TRACEBACK_HEAD:
            line = "  " + line
        lines.append(line)

    if not found:
        for line in text.split("\n"):
            add(line)
        return "\n".join(lines)
    *earlier, start = before.split("\n")
    end, *later = after.split("\n")
    for line in earlier:
        add(line)
    add(start + message + end, margin=True)
    for line in later:
        add(line)
    return "\n".join(lines)
