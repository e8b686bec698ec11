"""Sans-IO reader for the client-to-server byte stream.

A 4.8 client sends a signed 32-bit big-endian length followed by that many
bytes of zip archive, then waits for the server to answer and close.  A
length of zero is a certificate probe (``stap --trust-servers``).  This
module turns bytes into one terminal event; it never touches a socket.
"""

from __future__ import annotations

import struct
from typing import Union

from attrs import frozen

_LENGTH = struct.Struct(">i")


@frozen
class CertificateProbe:
    """The client only wanted to see (and maybe trust) our certificate."""


@frozen
class RequestTooLarge:
    """The announced compressed size is over the limit (or negative).

    ``drained`` says whether the whole announced body was read (and thrown
    away), so that an answer can be sent: a real client only reads the
    answer once it has sent everything.
    """

    size: int
    limit: int
    drained: bool = False

    @property
    def client_message(self) -> str:
        """Why the client is refused, for its stderr."""
        return (f"Server: The request is {self.size} bytes compressed; this server "
                f"accepts at most {self.limit} bytes (its --max-compressed-request).")


@frozen
class RequestReceived:
    """A complete request archive."""

    body: bytes


@frozen
class RequestTruncated:
    """The client went away before sending everything it announced."""

    expected: int
    received: int


RequestEvent = Union[CertificateProbe, RequestTooLarge, RequestReceived, RequestTruncated]


#: Over-size requests up to this many bytes are read and thrown away so the
#: client can be told why it was refused; bigger ones are cut off at once.
DRAIN_LIMIT = 64 * 1024 * 1024


class RequestReader:
    """Accumulates the request stream and reports what it turned out to be.

    ``feed`` returns ``None`` while more bytes are needed and a terminal event
    exactly once; after that, further bytes are ignored, as the real server
    never reads past the announced length.
    """

    def __init__(self, max_compressed_size: int, drain_limit: int = DRAIN_LIMIT) -> None:
        self._limit = max_compressed_size
        self._drain_limit = drain_limit
        self._buffer = bytearray()
        self._expected: int | None = None
        self._received = 0
        self._keep = True
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def bytes_buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> RequestEvent | None:
        if self._done:
            return None
        if self._expected is None:
            self._buffer += data
            if len(self._buffer) < _LENGTH.size:
                return None
            (size,) = _LENGTH.unpack_from(self._buffer)
            data = bytes(self._buffer[_LENGTH.size:])
            self._buffer = bytearray()
            if size == 0:
                return self._finish(CertificateProbe())
            if size < 0 or size > self._drain_limit:
                return self._finish(RequestTooLarge(size, self._limit))
            self._expected = size
            self._keep = size <= self._limit
        wanted = self._expected - self._received
        chunk = data[:wanted]
        self._received += len(chunk)
        if self._keep:
            self._buffer += chunk
        if self._received < self._expected:
            return None
        if not self._keep:
            return self._finish(RequestTooLarge(self._expected, self._limit, drained=True))
        return self._finish(RequestReceived(bytes(self._buffer)))

    def connection_lost(self) -> RequestEvent | None:
        """The peer closed; report a partial request if one was under way."""
        if self._done or self._expected is None:
            return None
        return self._finish(RequestTruncated(self._expected, self._received))

    def _finish(self, event: RequestEvent) -> RequestEvent:
        self._done = True
        self._buffer = bytearray()
        return event
