"""Request counters (stapsrv.core.counters) and their one-line text."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.counters import Counters, describe, parse, render


class FormatTests(TestCase):
    def test_round_trip_and_status_line(self) -> None:
        counters = Counters(requests=12, failures=1, cache_hits=8, compiling=2, waiting=3)
        text = render(counters)
        self.assertEqual(text, "requests=12 failures=1 cache_hits=8 compiling=2 waiting=3\n")
        self.assertEqual(parse(text), counters)
        self.assertEqual(describe(counters), "  requests 12, failures 1, cache hits 8, "
                                             "compiling 2, waiting 3\n")

    def test_incomplete_text_is_not_counters(self) -> None:
        for text in ("", "requests=1 failures=0", "requests=1 failures=0 cache_hits=0 "
                     "compiling=0 waiting=0"):
            self.assertIsNone(parse(text))
