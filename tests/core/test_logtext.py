"""Client text in log lines: control characters escaped."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.logtext import escape_controls, escape_traceback


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


class EscapeTracebackTests(TestCase):
    TRACEBACK = ('Traceback (most recent call last):\n'
                 '  File "/srv/x.py", line 3, in handle\n'
                 '    raise ValueError(name)\n'
                 'builtins.ValueError: {value}\n')

    def test_a_client_newline_in_the_message_stays_on_its_line(self) -> None:
        value = "x\nMon Dec  1 00:00:00 2026: Request from 10.0.0.1:1 complete\x1b[2J"
        message = f"builtins.ValueError: {value}"
        text = escape_traceback(self.TRACEBACK.format(value=value), message)
        self.assertEqual(text.split("\n"), [
            "Traceback (most recent call last):",
            '  File "/srv/x.py", line 3, in handle',
            "    raise ValueError(name)",
            "builtins.ValueError: x\\nMon Dec  1 00:00:00 2026: Request from 10.0.0.1:1 "
            "complete\\x1b[2J"])

    def test_lines_at_the_margin_are_indented_when_the_message_is_not_found(self) -> None:
        text = escape_traceback(self.TRACEBACK.format(value="a\nforged\r"), "other: thing")
        lines = text.split("\n")
        self.assertEqual(lines[0], "Traceback (most recent call last):")
        self.assertEqual(lines[-2:], ["  builtins.ValueError: a", "  forged\\r"])

    def test_an_ordinary_traceback_reads_as_before(self) -> None:
        traceback = self.TRACEBACK.format(value="no such file")
        self.assertEqual(escape_traceback(traceback, "builtins.ValueError: no such file"),
                         traceback.rstrip("\n"))
