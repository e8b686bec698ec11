"""A raw, blocking client for poking a compile server with arbitrary bytes.

Meant for hostile-input, fault and load tests: it speaks just enough of the
4.8 wire protocol (TLS, then a 4-byte signed big-endian length and a zip body;
the answer is a bare zip followed by close) and lets the caller break every
step of it.  Everything is synchronous (plain ``socket``/``ssl``) so it can run
in a thread (``twisted.internet.threads.deferToThread``) or from a script.

Typical use::

    from tests.helpers.rawclient import exchange, build_request, parse_response
    result = exchange(port, cafile, frame(build_request({...})))
    assert result.outcome == ANSWERED
    response = parse_response(result.data)
    assert response.rc == 1
"""

from __future__ import annotations

import io
import socket
import ssl
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from attrs import define, field

#: ``RawResult.outcome`` values.
ANSWERED = "answered"            #: some bytes came back, then the server closed
CLOSED = "closed"                #: the server closed (cleanly) without sending anything
RESET = "reset"                  #: connection reset / broken pipe / TLS torn down abruptly
TIMEOUT = "timeout"              #: nothing decisive happened within the read timeout
HANDSHAKE_FAILED = "handshake-failed"  #: the TLS handshake did not complete
REFUSED = "refused"              #: could not connect at all

_LENGTH = struct.Struct(">i")


def _short_bytes(data: bytes) -> str:
    if len(data) <= 80:
        return repr(data)
    return f"{data[:80]!r}... ({len(data)} bytes)"


@define
class RawResult:
    outcome: str
    data: bytes = field(default=b"", repr=_short_bytes)
    #: seconds from the connect until the outcome was known
    elapsed: float = 0.0
    error: Optional[str] = None
    #: the server's certificate (DER) when TLS was established
    peer_cert: Optional[bytes] = field(default=None, repr=False)
    #: our end's port (the server logs peers as ``127.0.0.1:PORT``)
    local_port: int = 0

    @property
    def closed_without_answer(self) -> bool:
        return self.outcome in (CLOSED, RESET) and not self.data


def frame(body: bytes, length: Optional[int] = None) -> bytes:
    """The 4-byte signed big-endian length (``len(body)`` unless given) + body."""
    return _LENGTH.pack(len(body) if length is None else length) + body


def client_context(cafile: Union[str, Path, None]) -> ssl.SSLContext:
    """A TLS client context trusting exactly ``cafile`` (the server's
    ``stap.cert``, DER or PEM), without host name checks, as the 4.8 client does (it pins
    the certificate, not a name).  ``cafile=None`` trusts anything."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if cafile is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        data = Path(cafile).read_bytes()
        if b"-----BEGIN" in data:
            context.load_verify_locations(cadata=data.decode("ascii"))
        else:  # stapsrv and 4.8 keep stap.cert in DER form
            context.load_verify_locations(cadata=data)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _connect(port: int, host: str, timeout: float,
             source: Optional[str] = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=None if source is None else (source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_close(sock: Union[socket.socket, ssl.SSLSocket], deadline: float,
                      limit: int) -> tuple[str, bytes, Optional[str]]:
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return TIMEOUT, bytes(data), None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return TIMEOUT, bytes(data), None
        except ssl.SSLZeroReturnError:
            return (ANSWERED if data else CLOSED), bytes(data), None
        except ssl.SSLEOFError as exc:
            # peer closed TCP without close_notify
            return (ANSWERED if data else CLOSED), bytes(data), str(exc)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as exc:
            return RESET, bytes(data), f"{type(exc).__name__}: {exc}"
        if not chunk:
            return (ANSWERED if data else CLOSED), bytes(data), None
        data += chunk
        if len(data) > limit:
            return ANSWERED, bytes(data), "answer larger than read limit"


def exchange(port: int, cafile: Union[str, Path, None], payload: Union[bytes, Iterable[bytes]] = b"",
             *, host: str = "127.0.0.1", source: Optional[str] = None, tls: bool = True,
             close_after_send: bool = False,
             shutdown_write: bool = False, pause: float = 0.0, read: bool = True,
             connect_timeout: float = 10.0, timeout: float = 15.0,
             read_limit: int = 256 * 1024 * 1024) -> RawResult:
    """Connect, optionally do TLS, send ``payload``, and see what comes back.

    ``payload`` is bytes or an iterable of byte chunks (sent with ``pause``
    seconds between them).  ``close_after_send`` closes the connection right
    after sending (the answer, if any, is not read: outcome CLOSED, meaning
    "we closed").  ``shutdown_write`` half-closes the TCP write side after
    sending (plain TCP only; for TLS it sends close_notify first).
    ``read=False`` returns right after sending, leaving nothing open.
    ``timeout`` bounds the wait for the answer / close, counted from connect.
    ``source`` is the local address to connect from (another loopback
    address plays another client).
    """
    start = time.monotonic()
    deadline = start + timeout
    try:
        raw = _connect(port, host, connect_timeout, source)
    except OSError as exc:
        return RawResult(REFUSED, error=str(exc), elapsed=time.monotonic() - start)
    local_port = raw.getsockname()[1]
    try:
        result = _exchange(raw, tls, cafile, deadline, start, payload, pause,
                           close_after_send, shutdown_write, read, read_limit)
        result.local_port = local_port
        return result
    finally:
        try:
            raw.close()
        except OSError:
            pass


def _exchange(raw: socket.socket, tls: bool, cafile: Union[str, Path, None], deadline: float,
              start: float, payload: Union[bytes, Iterable[bytes]], pause: float,
              close_after_send: bool, shutdown_write: bool, read: bool,
              read_limit: int) -> RawResult:
    sock: Union[socket.socket, ssl.SSLSocket] = raw
    peer = None
    try:
        if tls:
            try:
                raw.settimeout(max(0.1, deadline - time.monotonic()))
                sock = client_context(cafile).wrap_socket(raw, server_hostname=None)
                peer = sock.getpeercert(binary_form=True)
            except (socket.timeout, TimeoutError) as exc:
                return RawResult(TIMEOUT, error=f"handshake: {exc}",
                                 elapsed=time.monotonic() - start)
            except (ssl.SSLError, OSError) as exc:
                return RawResult(HANDSHAKE_FAILED, error=f"{type(exc).__name__}: {exc}",
                                 elapsed=time.monotonic() - start)
        chunks = [payload] if isinstance(payload, (bytes, bytearray)) else list(payload)
        try:
            for index, chunk in enumerate(chunks):
                if index and pause:
                    time.sleep(pause)
                if chunk:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(chunk)
        except (socket.timeout, TimeoutError) as exc:
            return RawResult(TIMEOUT, error=f"send: {exc}", elapsed=time.monotonic() - start,
                             peer_cert=peer)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as exc:
            # The server gave up on us mid-send; maybe it answered first.
            outcome, data, _ = _safe_drain(sock, deadline, read_limit)
            return RawResult(outcome if data else RESET, data,
                             time.monotonic() - start, f"send: {type(exc).__name__}: {exc}",
                             peer)
        if close_after_send:
            return RawResult(CLOSED, elapsed=time.monotonic() - start, peer_cert=peer,
                             error="closed by us")
        if shutdown_write:
            try:
                if isinstance(sock, ssl.SSLSocket):
                    raw_sock = sock.unwrap()
                    sock = raw_sock
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if not read:
            return RawResult(CLOSED, elapsed=time.monotonic() - start, peer_cert=peer,
                             error="not read")
        outcome, data, error = _read_until_close(sock, deadline, read_limit)
        return RawResult(outcome, data, time.monotonic() - start, error, peer)
    finally:
        try:
            sock.close()
        except OSError:
            pass
        if sock is not raw:
            try:
                raw.close()
            except OSError:
                pass


def _safe_drain(sock: Union[socket.socket, ssl.SSLSocket], deadline: float, limit: int) -> tuple[str, bytes, Optional[str]]:
    try:
        return _read_until_close(sock, min(deadline, time.monotonic() + 2.0), limit)
    except Exception as exc:  # pragma: no cover - best effort
        return RESET, b"", str(exc)


def send_request(port: int, cafile: Union[str, Path, None], body: bytes,
                 **kwargs: Any) -> RawResult:
    """Frame ``body`` with its own length and exchange it."""
    return exchange(port, cafile, frame(body), **kwargs)


class OpenConnection:
    """A connection kept open by hand (for slow-loris / concurrency tests).

    ``OpenConnection(port, cafile)`` connects (and does TLS unless
    ``tls=False``); ``send``; then ``result()`` reads until close/timeout.
    """

    def __init__(self, port: int, cafile: Union[str, Path, None], *, host: str = "127.0.0.1",
                 tls: bool = True, timeout: float = 15.0) -> None:
        self.start = time.monotonic()
        self.raw = _connect(port, host, timeout)
        self.sock: Union[socket.socket, ssl.SSLSocket] = self.raw
        if tls:
            self.raw.settimeout(timeout)
            self.sock = client_context(cafile).wrap_socket(self.raw, server_hostname=None)

    def send(self, data: bytes, timeout: float = 15.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def result(self, timeout: float = 15.0, read_limit: int = 256 * 1024 * 1024) -> RawResult:
        outcome, data, error = _read_until_close(self.sock, time.monotonic() + timeout,
                                                 read_limit)
        return RawResult(outcome, data, time.monotonic() - self.start, error)

    def close(self) -> None:
        for sock in (self.sock, self.raw):
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "OpenConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- zips


@define
class Member:
    """A zip member for :func:`build_request` with control over its mode.

    ``mode`` is a Unix st_mode (e.g. ``stat.S_IFLNK | 0o777``) stored in the
    high 16 bits of ``external_attr`` (for names zipfile cannot write, or
    lying headers, use :func:`zip_entry` and :func:`handmade_zip`).
    """

    data: bytes = b""
    mode: Optional[int] = None
    compress: int = zipfile.ZIP_DEFLATED
    external_attr: Optional[int] = None


MemberValue = Union[bytes, str, Member]


def build_request(members: Mapping[str, MemberValue], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive with ``members`` (name -> bytes / str / Member), in order.

    Names ending in ``/`` become directory entries.  Use :class:`Member` for
    symlinks, devices, fifos or names zipfile would not write.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, value in members.items():
            member = value if isinstance(value, Member) else Member(
                value.encode() if isinstance(value, str) else bytes(value),
                compress=compression)
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = member.compress
            info.create_system = 3  # Unix, so external_attr's high bits count
            if name.endswith("/"):
                mode = member.mode if member.mode is not None else stat.S_IFDIR | 0o755
                info.external_attr = (mode << 16) | 0x10
            else:
                mode = member.mode if member.mode is not None else stat.S_IFREG | 0o644
                info.external_attr = mode << 16
            if member.external_attr is not None:
                info.external_attr = member.external_attr
            archive.writestr(info, member.data)
    return buffer.getvalue()


def zip_entry(name: bytes, data: bytes, *, method: int = zipfile.ZIP_DEFLATED,
              crc: Optional[int] = None, size: Optional[int] = None, flags: int = 0,
              mode: int = stat.S_IFREG | 0o644,
              compressed: Optional[bytes] = None) -> tuple[bytes, bytes]:
    """One member for :func:`handmade_zip`: its local header + data and its
    central directory record, with every field under the caller's control
    (raw byte names, lying sizes or CRC, flags, any method number)."""
    if compressed is None:
        if method == zipfile.ZIP_DEFLATED:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            compressed = compressor.compress(data) + compressor.flush()
        else:
            compressed = data
    crc = zlib.crc32(data) if crc is None else crc
    size = len(data) if size is None else size
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc,
                        len(compressed), size, len(name), 0) + name + compressed
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, 20, flags,
                          method, 0, 0x21, crc, len(compressed), size, len(name), 0, 0, 0, 0,
                          (mode & 0xFFFF) << 16, 0)
    return local, central + name


def handmade_zip(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A zip archive of :func:`zip_entry` results, in order (the central
    directory's offsets are filled in here)."""
    body = b""
    central = b""
    count = 0
    for local, record in entries:
        central += record[:42] + struct.pack("<I", len(body)) + record[46:]
        body += local
        count += 1
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(body), 0)
    return body + central + end


def build_request_raw_names(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A zip whose member names are arbitrary bytes (NUL, newline, non-UTF-8)."""
    return handmade_zip(zip_entry(name, data) for name, data in entries)


def basic_request(script: str = "probe begin { exit() }", *, release: str,
                  args: Iterable[str] = ("-p4",), extra: Optional[Mapping[str, MemberValue]] = None,
                  sysinfo: Optional[str] = None, version: str = "4.8",
                  locale: str = "LANG=C.UTF-8\n") -> dict[str, MemberValue]:
    """Members of a well-formed ``-e`` request laid out as the 4.8 client does
    (see spec/samples/req-p4-stapusr-e.zip): ``argv1`` = ``-rRELEASE``, then
    ``args``, then ``-eSCRIPT``; ``sysinfo`` = ``sysinfo: RELEASE x86_64``.
    ``script=None`` leaves out the ``-e`` argument.
    """
    members: dict[str, MemberValue] = {}
    argv = [f"-r{release}", *args]
    if script is not None:
        argv.append(f"-e{script}")
    for index, arg in enumerate(argv, 1):
        members[f"argv{index}"] = arg
    members["locale"] = locale
    members["sysinfo"] = sysinfo if sysinfo is not None else f"sysinfo: {release} x86_64"
    members["version"] = version
    members.update(extra or {})
    return members


# ---------------------------------------------------------------- responses


@define
class Response:
    members: dict[str, bytes] = field(factory=dict)

    @property
    def rc(self) -> Optional[int]:
        raw = self.members.get("rc")
        if raw is None:
            return None
        return int(raw.decode().strip())

    @property
    def stdout(self) -> str:
        return self.members.get("stdout", b"").decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.members.get("stderr", b"").decode(errors="replace")

    @property
    def version(self) -> Optional[str]:
        raw = self.members.get("version")
        return None if raw is None else raw.decode(errors="replace")

    @property
    def modules(self) -> list[str]:
        return sorted(name for name in self.members if name.endswith(".ko"))


def parse_response(data: bytes) -> Response:
    """The members of a response zip (directories skipped)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return Response({info.filename: archive.read(info) for info in archive.infolist()
                         if not info.is_dir()})
