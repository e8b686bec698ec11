"""Replacing server paths in output that arrives in chunks."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from stapsrv.core.rewrite import StreamReplacer, replace_in_chunks
from tests.helpers.strategies import fixed


def whole(data: bytes, needles: list[bytes], replacement: bytes) -> bytes:
    """The same replacement done on the whole stream at once."""
    ordered = sorted(set(n for n in needles if n), key=len, reverse=True)
    if not ordered:
        return data
    return re.sub(b"|".join(re.escape(n) for n in ordered), replacement.replace(b"\\", b"\\\\"),
                  data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


class StreamReplacerTests(TestCase):
    HOME = b"/home/stapsrv"
    SCRATCH = b"/tmp/stap-server.abc/response"

    def test_needle_split_across_chunks(self) -> None:
        data = b"error in " + self.SCRATCH + b"/stap000000/x.c and " + self.HOME + b"/y\n"
        for cut in range(1, len(data)):
            out = b"".join(replace_in_chunks([data[:cut], data[cut:]],
                                             [self.HOME, self.SCRATCH], b"<server>"))
            self.assertEqual(out, b"error in <server>/stap000000/x.c and <server>/y\n", cut)

    def test_longest_needle_wins(self) -> None:
        out = b"".join(replace_in_chunks([b"/tmp/a/b c", b" /tmp/a"], [b"/tmp/a", b"/tmp/a/b"],
                                         b"<s>"))
        self.assertEqual(out, b"<s> c <s>")

    def test_holds_less_than_a_needle(self) -> None:
        replacer = StreamReplacer([self.SCRATCH], b"<server>")
        flood = b"x" * (1 << 20)
        self.assertEqual(len(replacer.feed(flood)), len(flood) - (len(self.SCRATCH) - 1))
        self.assertEqual(len(replacer.finish()), len(self.SCRATCH) - 1)
        self.assertFalse(replacer.changed)

    @fixed(300)
    @given(parts=st.lists(st.sampled_from([b"/a/b", b"/a", b"x", b"/", b"b", b"\n", b"/a/bb"]),
                          max_size=40),
           needles=st.lists(st.sampled_from([b"/a/b", b"/a", b"bb", b"", b"/a/b/"]), max_size=3),
           cuts=st.lists(st.integers(0, 500), max_size=8))
    def test_any_chunking_gives_the_whole_answer(self, parts: list[bytes], needles: list[bytes],
                                                 cuts: list[int]) -> None:
        data = b"".join(parts)
        expected = whole(data, needles, b"<server>")
        self.assertEqual(b"".join(replace_in_chunks(chunked(data, cuts), needles, b"<server>")),
                         expected)
