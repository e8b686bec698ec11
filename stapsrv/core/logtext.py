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
