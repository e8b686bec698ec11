from __future__ import annotations

import struct

from twisted.trial.unittest import TestCase

from stapsrv.core.framing import (
    CertificateProbe,
    RequestReader,
    RequestReceived,
    RequestTooLarge,
    RequestTruncated,
)
from tests.helpers.vectors import CAPTURE


def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


class RequestReaderTests(TestCase):
    def test_captured_stream_byte_by_byte(self) -> None:
        """The real client's stream, fed one byte at a time, yields its zip."""
        stream = (CAPTURE / "01-trivial-p4.c2s.bin").read_bytes()
        body = (CAPTURE / "01-trivial-p4.request.zip").read_bytes()
        reader = RequestReader(5000)
        events = [reader.feed(stream[i:i + 1]) for i in range(len(stream))]
        self.assertEqual([e for e in events if e is not None], [RequestReceived(body)])
        self.assertTrue(all(e is None for e in events[:-1]))

    def test_every_capture_in_one_piece(self) -> None:
        for stream_path in sorted(CAPTURE.glob("*.c2s.bin")):
            body = stream_path.with_name(
                stream_path.name.replace(".c2s.bin", ".request.zip")).read_bytes()
            event = RequestReader(5000).feed(stream_path.read_bytes())
            self.assertEqual(event, RequestReceived(body), stream_path.name)

    def test_zero_length_is_a_probe(self) -> None:
        self.assertEqual(RequestReader(5000).feed(b"\0\0\0\0"), CertificateProbe())

    def test_over_the_limit_is_drained_then_reported(self) -> None:
        reader = RequestReader(10)
        self.assertIsNone(reader.feed(frame(b"x" * 11)[:-1]))
        self.assertEqual(reader.bytes_buffered, 0, "refused bytes are not kept")
        self.assertEqual(reader.feed(b"x"), RequestTooLarge(11, 10, drained=True))

    def test_far_over_the_limit_is_cut_off_at_once(self) -> None:
        reader = RequestReader(10, drain_limit=100)
        self.assertEqual(reader.feed(struct.pack(">i", 101)), RequestTooLarge(101, 10))

    def test_at_the_limit(self) -> None:
        self.assertEqual(RequestReader(10).feed(frame(b"x" * 10)), RequestReceived(b"x" * 10))

    def test_negative_length(self) -> None:
        self.assertEqual(RequestReader(5000).feed(b"\xff\xff\xff\xfe"), RequestTooLarge(-2, 5000))

    def test_short_request_reported_on_close(self) -> None:
        reader = RequestReader(5000)
        self.assertIsNone(reader.feed(struct.pack(">i", 100) + b"abc"))
        self.assertEqual(reader.connection_lost(), RequestTruncated(100, 3))

    def test_close_before_length_is_silent(self) -> None:
        reader = RequestReader(5000)
        reader.feed(b"\0\0")
        self.assertIsNone(reader.connection_lost())

    def test_bytes_after_the_request_are_ignored(self) -> None:
        reader = RequestReader(5000)
        self.assertEqual(reader.feed(frame(b"abc") + b"trailing"), RequestReceived(b"abc"))
        self.assertIsNone(reader.feed(b"more"))
        self.assertIsNone(reader.connection_lost())
        self.assertTrue(reader.done)
