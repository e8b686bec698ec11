"""Client text in log lines: control characters escaped."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.logtext import escape_controls


class EscapeControlsTests(TestCase):
    def test_line_breaks_and_escape_sequences(self) -> None:
        forged = "-p4\nMon Dec  1 00:00:00 2026: Request from 10.0.0.1:1 complete\r\x1b[2J"
        escaped = escape_controls(forged)
        self.assertEqual(escaped, "-p4\\nMon Dec  1 00:00:00 2026: Request from 10.0.0.1:1 "
                                  "complete\\r\\x1b[2J")
        self.assertNotIn("\n", escaped)

    def test_every_c0_c1_and_separator(self) -> None:
        controls = "".join(map(chr, [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]))
        escaped = escape_controls(controls)
        self.assertTrue(escaped.isprintable(), escaped)
        self.assertEqual(escape_controls("\x85\u2028\t"), "\\x85\\u2028\\t")

    def test_ordinary_text_kept(self) -> None:
        text = 'probe begin { printf("%s\\n", "čeština ✓") }'
        self.assertEqual(escape_controls(text), text)

    def test_undecodable_bytes(self) -> None:
        self.assertEqual(escape_controls(b"a\xff".decode("utf-8", "surrogateescape")),
                         "a\\udcff")
