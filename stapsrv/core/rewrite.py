"""Replacing byte strings in a stream that arrives in chunks.

The translator's output names server paths that clients must not see
(they read ``<server>`` instead); the output can be large, so it is
rewritten chunk by chunk, and a path cut in two by a chunk boundary is
still found.  Among needles that match at the same place the longest wins;
matches do not overlap, as with ``bytes.replace`` applied longest first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator


class StreamReplacer:
    """``feed`` chunks and join what it and ``finish`` return: the whole
    stream with every needle replaced.  Holds at most the longest needle's
    length (less one) between calls, whatever the chunk sizes."""

    def __init__(self, needles: Iterable[bytes], replacement: bytes) -> None:
        ordered = sorted({needle for needle in needles if needle}, key=len, reverse=True)
        self._pattern = (re.compile(b"|".join(re.escape(needle) for needle in ordered))
                         if ordered else None)
        self._keep = max((len(needle) for needle in ordered), default=1) - 1
        self._replacement = replacement
        self._pending = b""
        #: Whether any needle was found so far.
        self.changed = False

    def feed(self, chunk: bytes) -> bytes:
        return self._rewrite(self._pending + chunk, final=False)

    def finish(self) -> bytes:
        return self._rewrite(self._pending, final=True)

    def _rewrite(self, data: bytes, final: bool) -> bytes:
        if self._pattern is None:
            self._pending = b""
            return data
        # A match that starts before ``settled`` has every needle's full
        # length in ``data``, so no later byte can change it.
        settled = len(data) if final else max(0, len(data) - self._keep)
        out = []
        position = 0
        for match in self._pattern.finditer(data):
            if match.start() >= settled:
                break
            out.append(data[position:match.start()])
            out.append(self._replacement)
            position = match.end()
            self.changed = True
        keep_from = max(position, settled)
        out.append(data[position:keep_from])
        self._pending = data[keep_from:]
        return b"".join(out)


def replace_in_chunks(chunks: Iterable[bytes], needles: Iterable[bytes],
                      replacement: bytes) -> Iterator[bytes]:
    """The chunks with every needle replaced (see :class:`StreamReplacer`)."""
    replacer = StreamReplacer(needles, replacement)
    for chunk in chunks:
        yield replacer.feed(chunk)
    yield replacer.finish()
