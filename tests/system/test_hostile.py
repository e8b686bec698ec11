"""Hostile input against a real stapsrv (twistd stap-server as the server
user, on loopback, ``--request-timeout 3``), through the raw client in
``tests/rawclient.py``.

Each test sends one kind of hostile input and asserts the documented
outcome (doc/differences.md, stapsrv/server.py, framing.py, archive.py,
handler.py, request.py, cmdline.py):

* a refusal archive: ``rc`` 1 and a ``Server: ...`` message;
* the translator's own error: ``rc`` 1 and its message (``--client-options``
  makes stap refuse the options a client must not use);
* a plain close without any answer, as 4.8 does, with the 4.8 log line;
* or a normal compile, when the input is harmless after all (locale lines
  are filtered, ``--sign-module`` is dropped, ``-o``/``-c`` do nothing for
  pass 4).

After every case ``tearDown`` checks that the server is unharmed: an
exchange that got no answer ended within ``CASE_LIMIT`` seconds (an answer
may wait on a real compile, whose time is the machine's business, not the
server's), the server process is alive, its open
descriptors and child processes are back to their count before the case,
its ``$TMPDIR`` (scratch ``stap-server.*`` directories), its base
directory, the server user's home and ``/tmp`` (entries owned by the server
user) are back to what they were, none of the files a case tried to create
exists, and a real ``stap`` client then compiles a module (rc 0, a .ko).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import io
import os
import shutil
import stat
import re
import struct
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import header_release, require, require_program
from tests.helpers.faults import wait_for_warm_up
from tests.helpers.gate import CompileGate
from tests.helpers.rawclient import (
    ANSWERED,
    CLOSED,
    RESET,
    Member,
    OpenConnection,
    RawResult,
    Response,
    basic_request,
    build_request,
    build_request_raw_names,
    exchange,
    frame,
    handmade_zip,
    parse_response,
    zip_entry,
)
from tests.helpers.realserver import (
    STAP,
    Client,
    ServerProcess,
    owned_directory,
    remove_tree,
    scratch_directory,
    start_stapsrv,
    test_user,
)
from tests.helpers.waiting import poll

RELEASE = header_release()
#: The suite's server's --request-timeout.
REQUEST_TIMEOUT = 3.0
#: Every answer or close must come within this many seconds.
CASE_LIMIT = 10.0
#: How long an exchange that waits on a real compile may take before the
#: test gives up: a net for a server that hangs, never a measure of speed.
COMPILE_NET = 300.0
#: How long closes, kills and removals may take to show after a case.
SETTLE = 5.0
#: The server's limits (the defaults, as 4.8's).
MAX_COMPRESSED = 5000
MAX_REQUEST = 50000
MAX_MEMBERS = 4096
DRAIN_LIMIT = 64 * 1024 * 1024

HELLO = "probe begin { exit() }"
#: Files hostile cases try to create; none may ever exist.
FORBIDDEN = [
    "/tmp/pwned", "/etc/x", "/tmp/stapsrv-hostile-tmpdir", "/tmp/stapsrv-hostile-abs",
    "/tmp/stapsrv-hostile-B", "/etc/stapsrv-hostile",
    "/tmp/stapsrv-hostile-m.ko",
]


# ------------------------------------------------------------------ the server


_shared_dirs: dict[str, Path] = {}


def _shared_dir(name: str, owned: bool = False) -> Path:
    """A directory both suite servers use, made once per run."""
    if name not in _shared_dirs:
        path = scratch_directory(f"hostile-{name}-")
        _shared_dirs[name] = owned_directory(path) if owned else path
        atexit.register(remove_tree, path)
    return _shared_dirs[name]


class _Suite:
    """The suite's server and its trusted real client, made on first use
    (and again if a case kills the server).

    Both suite servers share a response cache and a SYSTEMTAP_DIR of their
    own (not the test run's shared ones): every run exercises the
    translator, and the MOK cases' store stays out of other tests'
    servers.  ``warm_with`` is a suite whose server compiles the check
    script first, so that a server with a short --compile-timeout answers
    the check from the shared cache even on a cold machine; a suite
    without one compiles the check script itself before the first case, so
    that no case waits on that compile.  Both show their translators the
    run's compile gate (tests/helpers/gate.py), which nothing ever opens:
    a compile that includes it never finishes.
    """

    def __init__(self, arguments: list[str], warm_with: Optional["_Suite"] = None) -> None:
        self.arguments = arguments
        self.warm_with = warm_with
        self.server: Optional[ServerProcess] = None
        self.client: Optional[Client] = None

    def get(self) -> tuple[ServerProcess, Client]:
        if self.server is None or self.server.exit_code is not None:
            if self.warm_with is not None:
                _warm(*self.warm_with.get())
            cache = _shared_dir("cache")
            systemtap_dir = _shared_dir("systemtap", owned=True)
            self.server = start_stapsrv([*self.arguments, *GATE.get().server_arguments(),
                                         "--cache-dir", str(cache)],
                                        release=RELEASE,
                                        env={"SYSTEMTAP_DIR": str(systemtap_dir)})
            atexit.register(_stop_and_remove, self.server)
            # Its start-up compile must not be seen as a case's scratch.
            wait_for_warm_up(self.server, RELEASE)
            base = scratch_directory("hostile-client-")
            atexit.register(remove_tree, base)
            self.client = Client(base)
            done = subprocess.run(
                [STAP, f"--use-server={self.server.spec}", "--trust-servers=ssl,no-prompt"],
                env=self.client.env(), cwd=self.client.cwd, capture_output=True, timeout=60)
            if done.returncode != 0:
                raise AssertionError(f"trusting {self.server.spec} failed: {done.stderr!r}")
            if self.warm_with is None:
                _warm(self.server, self.client)
        assert self.client is not None
        return self.server, self.client


def _warm(server: ServerProcess, client: Client) -> None:
    """Compile the check script, plainly and in guru mode, before any case:
    its answer is then in the shared cache, and the server's guru-mode
    kernel configuration header made (the first guru request would make
    it), so that no case waits on either."""
    for guru in ([], ["-g"]):
        done = subprocess.run(
            [STAP, f"--use-server={server.spec}", "-r", RELEASE, "-p4", *guru, "-e", HELLO],
            env=client.env(), cwd=client.cwd, capture_output=True, timeout=COMPILE_NET)
        for name in client.modules():
            (client.cwd / name).unlink()
        if done.returncode != 0:
            raise AssertionError(f"warm-up compile {guru} failed: {done.stderr!r}")


class _Gate:
    """The run's compile gate, made on first use."""

    def __init__(self) -> None:
        self.gate: Optional[CompileGate] = None

    def get(self) -> CompileGate:
        if self.gate is None:
            base = scratch_directory("hostile-gate-")
            atexit.register(remove_tree, base)
            self.gate = CompileGate(base)
            atexit.register(self.gate.close)
        return self.gate


GATE = _Gate()


def _stop_and_remove(server: ServerProcess) -> None:
    server.stop()
    remove_tree(server.base)


SUITE = _Suite(["--request-timeout", str(int(REQUEST_TIMEOUT))])
#: A second server with limits raised far enough to get ten thousand
#: members past the compressed-size limit to the member count check.
#: It also stops translators after COMPILE_TIMEOUT seconds.
COMPILE_TIMEOUT = 3
BIG_SUITE = _Suite(["--request-timeout", str(int(REQUEST_TIMEOUT)),
                    "--max-compressed-request", "4000000", "--max-request-size", "4000000",
                    "--compile-timeout", str(COMPILE_TIMEOUT)], warm_with=SUITE)


# ------------------------------------------------------------------ probes


def _fd_targets(pid: int) -> dict[str, str]:
    result = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            result[name] = os.readlink(f"{directory}/{name}")
        except OSError:
            pass
    return result


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as source:
                pids += [int(word) for word in source.read().split()]
        except OSError:
            pass
    return pids


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the translator runs in a session of its
    own under ``setsid --wait``, so process groups do not tell)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in _children(pending.pop()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            return source.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _names(path: Path) -> frozenset[str]:
    try:
        return frozenset(os.listdir(path))
    except FileNotFoundError:
        return frozenset()


#: Scratch names other servers of the same user (other test runs with
#: TMPDIR=/tmp) use and remove; this suite's server never uses /tmp, as its
#: TMPDIR is its own directory (the TMPDIR check covers it).
_OTHERS_SCRATCH = re.compile(r"^(stap-server\.|stap|tmp)[A-Za-z0-9_]{6,8}$")


_ROTATED_LOG = re.compile(r"^twistd\.log\.\d+$")


def _owned_in_tmp(uid: int) -> frozenset[str]:
    names = set()
    for name in os.listdir("/tmp"):
        try:
            if os.lstat(os.path.join("/tmp", name)).st_uid == uid:
                names.add(name)
        except OSError:
            pass
    return frozenset(names)


class Snapshot:
    def __init__(self, server: ServerProcess) -> None:
        user = test_user()
        self.fds = _fd_targets(server.pid)
        self.children = _children(server.pid)
        self.tmpdir = _names(server.base / "tmp")
        self.base = frozenset(name for name in _names(server.base)
                              if not _ROTATED_LOG.match(name))
        self.home = _names(Path(user.pw_dir))
        self.tmp = _owned_in_tmp(user.pw_uid)

    def differences(self, other: "Snapshot") -> list[str]:
        """What ``other`` (taken later) has that this one had not."""
        problems = []
        if len(other.fds) != len(self.fds):
            added = {fd: target for fd, target in other.fds.items()
                     if self.fds.get(fd) != target}
            problems.append(f"server has {len(other.fds)} open fds, had {len(self.fds)} "
                            f"(new or changed: {added})")
        if len(other.children) != len(self.children):
            problems.append(
                f"server has {len(other.children)} children, had {len(self.children)}: "
                + "; ".join(f"{pid}: {_cmdline(pid)}" for pid in other.children))
        # (twistd rotates its own log past 1 MB: huge requests log huge lines)
        base_after = {name for name in other.base if not _ROTATED_LOG.match(name)}
        for label, before, after in (("$TMPDIR", self.tmpdir, other.tmpdir),
                                     ("server base directory", self.base, base_after)):
            if before != after:
                problems.append(f"{label} changed: new {sorted(after - before)}, "
                                f"gone {sorted(before - after)}")
        # Shared places: only what appeared counts (other test runs may
        # remove their own entries meanwhile).
        new_home = other.home - self.home
        if new_home:
            problems.append(f"new entries in the server user's home: {sorted(new_home)}")
        new_tmp = {name for name in other.tmp - self.tmp if not _OTHERS_SCRATCH.match(name)}
        if new_tmp:
            problems.append(f"new server-user entries in /tmp: {sorted(new_tmp)}")
        return problems


def _forbidden_present(extra: list[str]) -> list[str]:
    return [f"{path} exists" for path in FORBIDDEN + extra if os.path.lexists(path)]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


# ------------------------------------------------------------------ requests


def request(*arguments: str | bytes, script: Optional[str] = HELLO,
            drop: tuple[str, ...] = (), **members: Any) -> bytes:
    """A request zip as the 4.8 client lays it out: argv1 ``-rRELEASE``,
    then ``-p4`` unless arguments are given, then ``-eSCRIPT``; ``members``
    (``sysinfo=``, ``locale=``, ...) replace or add members."""
    argv: list[str | bytes] = [f"-r{RELEASE}", *(arguments or ("-p4",))]
    if script is not None:
        argv.append(f"-e{script}")
    content: dict[str, Any] = {f"argv{index}": value for index, value in enumerate(argv, 1)}
    content.update({"locale": "LANG=C.UTF-8\n", "sysinfo": f"sysinfo: {RELEASE} x86_64",
                    "version": "4.8"})
    content.update(members)
    for name in drop:
        content.pop(name, None)
    return build_request(content)


def with_member(name: str, value: Any, *, before: Optional[dict[str, Any]] = None) -> bytes:
    """A valid request plus one extra (hostile) member."""
    content = dict(basic_request(HELLO, release=RELEASE))
    content.update(before or {})
    content[name] = value
    return build_request(content)


def valid_members() -> list[tuple[bytes, bytes]]:
    return [zip_entry(name.encode(), value.encode() if isinstance(value, str) else value)
            for name, value in basic_request(HELLO, release=RELEASE).items()]


# ------------------------------------------------------------------ the tests


class HostileMixin:
    timeout = 120
    suite = SUITE

    # helpers ------------------------------------------------------------

    def setUp(self) -> Deferred[None]:
        require_program("stap")
        require_program("certutil")
        require(RELEASE is not None, "no kernel headers installed (make setup)")
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        self.server, self.client = await deferToThread(self.suite.get)
        self.cafile = self.server.base / "ssl" / "stap.cert"
        self.results: list[tuple[str, RawResult]] = []
        self.extra_forbidden: list[str] = []
        # Wait for an idle server (no children: a new server may still be
        # running helpers) whose descriptors stay put, then take the baseline.
        previous = None
        deadline = time.monotonic() + 4 * SETTLE
        while time.monotonic() < deadline:
            current = Snapshot(self.server)
            if (previous is not None and not current.children
                    and not previous.differences(current)):
                break
            previous = current
            await sleep(0.2)
        self.before = Snapshot(self.server)
        self.log_offset = self._log_size()

    def tearDown(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._after_case())

    async def _after_case(self) -> None:
        problems: list[str] = []
        for label, result in self.results:
            if result.outcome != ANSWERED and result.elapsed > CASE_LIMIT:
                problems.append(f"{label}: took {result.elapsed:.1f} s (limit {CASE_LIMIT} s)")
        if self.server.exit_code is not None:
            problems.append(f"server died (exit {self.server.exit_code}); log tail:\n"
                            + self.server.log()[-2000:])
            self.fail("\n".join(problems))
        problems += await self._settled("after the case")
        out, err, code = await self.client.stap(
            f"--use-server={self.server.spec}", "-r", RELEASE, "-p4", "-e", HELLO)
        modules = [name for name in self.client.modules() if name.endswith(".ko")]
        for name in self.client.modules():
            (self.client.cwd / name).unlink()
        if code != 0 or len(modules) != 1:
            problems.append(f"real client compile after the case failed: rc {code}, "
                            f"modules {modules}, stderr {err.decode(errors='replace')[-1500:]}")
        problems += await self._settled("after the real client's compile")
        if problems:
            self.fail("\n".join(problems))

    async def _settled(self, when: str) -> list[str]:
        deadline = time.monotonic() + SETTLE
        while True:
            problems = self.before.differences(Snapshot(self.server))
            problems += _forbidden_present(self.extra_forbidden)
            if not problems or time.monotonic() >= deadline:
                return [f"{when}: {problem}" for problem in problems]
            await sleep(0.1)

    def _log_size(self) -> int:
        try:
            return self.server.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def new_log(self) -> str:
        with open(self.server.log_path, "rb") as source:
            source.seek(self.log_offset)
            return source.read().decode(errors="replace")

    async def assert_logged(self, *texts: str, timeout: float = SETTLE) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.new_log()
            if all(text in log for text in texts) or time.monotonic() >= deadline:
                break
            await sleep(0.1)
        for text in texts:
            self.assertIn(text, log, f"log lacks {text!r}; new log:\n{log}")
        return log

    async def raw(self, payload: bytes | list[bytes] = b"", label: str = "exchange",
                  **options: Any) -> RawResult:
        """One raw exchange in a thread (bounded by COMPILE_NET)."""
        options.setdefault("timeout", COMPILE_NET)
        result = await deferToThread(exchange, self.server.port, self.cafile, payload,
                                     **options)
        self.results.append((label, result))
        return result

    async def send(self, body: bytes, **options: Any) -> RawResult:
        return await self.raw(frame(body), **options)

    def peer(self, result: RawResult) -> str:
        return f"127.0.0.1:{result.local_port}"

    # outcome assertions --------------------------------------------------

    def assert_closed_without_answer(self, result: RawResult, *, tls: bool = True,
                                     within: float = CASE_LIMIT) -> None:
        expected = (CLOSED, RESET) if tls else (CLOSED, RESET, ANSWERED)
        self.assertIn(result.outcome, expected,
                      f"expected a close without answer, got {result}")
        if tls:
            self.assertEqual(result.data, b"", "the server sent something")
        else:
            # a TLS alert record at most, never an answer
            self.assertTrue(result.data == b"" or result.data.startswith(b"\x15\x03"),
                            f"the server answered in clear: {result}")
        self.assertLess(result.elapsed, within)

    def assert_closed_by_timeout(self, result: RawResult) -> None:
        self.assertIn(result.outcome, (CLOSED, RESET),
                      f"the server did not close the idle connection: {result}")
        self.assertFalse(result.data.startswith(b"PK"), "an idle connection got an answer")
        self.assertGreaterEqual(result.elapsed, REQUEST_TIMEOUT - 0.5,
                                "closed before the request timeout")
        self.assertLess(result.elapsed, REQUEST_TIMEOUT + 5.0,
                        "not closed soon after the request timeout")

    def answer(self, result: RawResult) -> Response:
        self.assertEqual(result.outcome, ANSWERED, f"expected an answer, got {result}")
        try:
            return parse_response(result.data)
        except zipfile.BadZipFile as exc:
            self.fail(f"the answer is not a zip ({exc}): {result.data[:100]!r}")

    def assert_refused(self, result: RawResult, *texts: str, rc: int = 1) -> Response:
        """An answer with ``rc`` and each of ``texts`` in its stderr, no module."""
        response = self.answer(result)
        self.assertEqual(response.rc, rc, f"stderr: {response.stderr}")
        for text in texts:
            self.assertIn(text, response.stderr)
        self.assertEqual(response.modules, [])
        self.assertEqual(response.version, "4.8")
        return response

    def assert_compiled(self, result: RawResult) -> Response:
        response = self.answer(result)
        self.assertEqual(response.rc, 0, f"stderr: {response.stderr}")
        self.assertEqual(len(response.modules), 1, f"members: {sorted(response.members)}")
        self.assertTrue(response.modules[0].startswith("stap000000/"))
        self.assertEqual(response.members[response.modules[0]][:4], b"\x7fELF")
        return response

    async def assert_unsafe_archive(self, body: bytes, log_text: str) -> None:
        """Archives a real client never sends: refused before anything is
        written, closed without answer, the reason logged."""
        self.assertLessEqual(len(body), MAX_COMPRESSED, "test archive over the limit")
        result = await self.send(body)
        self.assert_closed_without_answer(result)
        await self.assert_logged(log_text, "Error processing client request")


class ConnectionTests(HostileMixin, TestCase):
    """Bytes that are not a TLS session or not a complete request."""

    async def test_plain_tcp_http_instead_of_tls(self) -> None:
        result = await self.raw(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", tls=False)
        self.assert_closed_without_answer(result, tls=False, within=2.0)

    async def test_plain_tcp_framed_request_instead_of_tls(self) -> None:
        result = await self.send(request(), tls=False)
        self.assert_closed_without_answer(result, tls=False, within=2.0)
        self.assertNotIn("Processing 1 request", self.new_log())

    async def test_plain_tcp_fake_client_hello_garbage(self) -> None:
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4
        result = await self.raw(hello, tls=False)
        self.assert_closed_without_answer(result, tls=False, within=2.0)

    async def test_plain_tcp_connect_then_silence(self) -> None:
        result = await self.raw(b"", tls=False)
        self.assert_closed_by_timeout(result)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_tls_then_immediate_close(self) -> None:
        result = await self.raw(b"", close_after_send=True)
        self.assertEqual(result.outcome, CLOSED)
        self.assertIsNotNone(result.peer_cert, "no TLS session")
        log = await self.assert_logged(f"Accepted connection from {self.peer(result)}")
        self.assertNotIn("while reading client request", log)

    async def test_tls_then_silence(self) -> None:
        result = await self.raw(b"")
        self.assert_closed_by_timeout(result)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_partial_length_prefix_then_silence(self) -> None:
        result = await self.raw(b"\x00\x00")
        self.assert_closed_by_timeout(result)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_partial_length_prefix_then_close(self) -> None:
        result = await self.raw(b"\x00\x00", close_after_send=True)
        log = await self.assert_logged(f"Accepted connection from {self.peer(result)}")
        self.assertNotIn("while reading client request", log)

    async def test_length_zero_is_a_certificate_probe(self) -> None:
        result = await self.raw(frame(b""))
        self.assert_closed_without_answer(result, within=2.0)

    async def test_length_negative(self) -> None:
        result = await self.raw(frame(b"", -1))
        self.assert_closed_without_answer(result, within=2.0)
        await self.assert_logged("Error size of (compressed) request file is too large "
                                 "(-1 bytes; the limit is 5000)")

    async def test_length_most_negative(self) -> None:
        result = await self.raw(frame(b"", -2 ** 31) + b"x" * 100)
        self.assert_closed_without_answer(result, within=2.0)
        await self.assert_logged("Error size of (compressed) request file is too large "
                                 "(-2147483648 bytes; the limit is 5000)")

    async def test_length_over_limit_is_drained_and_explained(self) -> None:
        body = os.urandom(MAX_COMPRESSED + 1000)
        result = await self.send(body)
        self.assert_refused(result, f"Server: The request is {len(body)} bytes compressed; "
                            "this server accepts at most 5000 bytes (its "
                            "--max-compressed-request).")
        await self.assert_logged("Error size of (compressed) request file is too large "
                                 f"({len(body)} bytes; the limit is 5000)")

    async def test_length_over_drain_limit_is_cut_off(self) -> None:
        result = await self.raw(frame(b"", DRAIN_LIMIT + 1) + b"x" * 4096)
        self.assert_closed_without_answer(result, within=2.0)
        await self.assert_logged("Error size of (compressed) request file is too large "
                                 f"({DRAIN_LIMIT + 1} bytes; the limit is 5000)")

    async def test_length_over_limit_short_body_then_silence(self) -> None:
        result = await self.raw(frame(b"x" * 100, MAX_COMPRESSED + 1000))
        self.assert_closed_by_timeout(result)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_length_larger_than_sent_then_close(self) -> None:
        body = request()
        await self.raw(frame(body[:100], len(body)), close_after_send=True)
        await self.assert_logged(f"Expected {len(body)} bytes, got 100 while reading "
                                 "client request from socket")

    async def test_length_larger_than_sent_then_half_close(self) -> None:
        body = request()
        result = await self.raw(frame(body[:100], len(body)), shutdown_write=True)
        self.assert_closed_without_answer(result, within=2.0)
        await self.assert_logged(f"Expected {len(body)} bytes, got 100 while reading "
                                 "client request from socket")

    async def test_length_larger_than_sent_then_silence(self) -> None:
        body = request()
        result = await self.raw(frame(body[:100], len(body)))
        self.assert_closed_by_timeout(result)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_slow_upload_is_cut_off_at_the_request_timeout(self) -> None:
        data = frame(request())
        chunks = [data[index:index + 4] for index in range(0, len(data), 4)]
        result = await self.raw(chunks, pause=0.25)
        self.assertFalse(result.data.startswith(b"PK"), "a too slow upload was answered")
        self.assertIn(result.outcome, (CLOSED, RESET), str(result))
        self.assertGreaterEqual(result.elapsed, REQUEST_TIMEOUT - 0.5)
        self.assertLess(result.elapsed, REQUEST_TIMEOUT + 5.0)
        await self.assert_logged(f"Timed out waiting for the request from {self.peer(result)}")

    async def test_trailing_bytes_after_the_request_are_ignored(self) -> None:
        result = await self.raw(frame(request()) + b"\x00garbage" * 512)
        self.assert_compiled(result)

    async def test_client_gone_during_compile_kills_the_translator(self) -> None:
        # A script held at the gate in pass 4 (it never finishes); the
        # client goes away once its compiler waits there.
        gate = GATE.get()
        body = request("-p4", "-g", script=gate.script("gone"))
        self.assertLessEqual(len(body), MAX_COMPRESSED)

        def connect_and_send() -> OpenConnection:
            connection = OpenConnection(self.server.port, self.cafile)
            connection.send(frame(body))
            return connection

        connection = await deferToThread(connect_and_send)
        try:
            # This server's compiler at the (shared) gate: not one of another
            # case's that is still being stopped.
            await gate.reached()
            at_gate = await poll(lambda: set(gate.holders()) & _descendants(self.server.pid),
                                 COMPILE_NET)
            self.assertTrue(at_gate, "the compiler at the gate")
            group = _descendants(self.server.pid)
        finally:
            connection.close()
        # SIGTERM to the translator's group at once, SIGKILL 2 s later.
        deadline = time.monotonic() + COMPILE_NET
        while time.monotonic() < deadline:
            left = group & _descendants(self.server.pid)
            if not left:
                break
            await sleep(0.1)
        self.assertEqual(left, set(), "translator processes outlived the client: "
                         + "; ".join(f"{pid}: {_cmdline(pid)}" for pid in left))
        await self.assert_logged(f"Options passed from the client: -r{RELEASE} -p4 -g")

    async def test_ten_concurrent_identical_requests(self) -> None:
        body = frame(request())

        def ten() -> list[RawResult]:
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                futures = [pool.submit(exchange, self.server.port, self.cafile, body,
                                       timeout=COMPILE_NET) for _ in range(10)]
                return [future.result() for future in futures]

        results = await deferToThread(ten)
        for index, result in enumerate(results):
            self.results.append((f"connection {index}", result))
            self.assert_compiled(result)

    async def test_ten_concurrent_silent_connections_do_not_block_a_client(self) -> None:
        def open_ten() -> list[OpenConnection]:
            return [OpenConnection(self.server.port, self.cafile) for _ in range(10)]

        started = time.monotonic()
        connections = await deferToThread(open_ten)
        try:
            out, err, code = await self.client.stap(
                f"--use-server={self.server.spec}", "-r", RELEASE, "-p4", "-e", HELLO)
            self.assertEqual(code, 0, err.decode())
            self.assertLess(time.monotonic() - started, REQUEST_TIMEOUT,
                            "the real client waited for the idle connections")

            def results() -> list[RawResult]:
                return [connection.result(timeout=CASE_LIMIT) for connection in connections]

            for index, result in enumerate(await deferToThread(results)):
                self.results.append((f"connection {index}", result))
                self.assertIn(result.outcome, (CLOSED, RESET), str(result))
                self.assertLess(time.monotonic() - started, REQUEST_TIMEOUT + 5)
        finally:
            for connection in connections:
                connection.close()
            for name in self.client.modules():
                (self.client.cwd / name).unlink()
        log = await self.assert_logged("Timed out waiting for the request from")
        self.assertEqual(log.count("Timed out waiting for the request from"), 10, log)

    async def test_ten_concurrent_hostile_connections(self) -> None:
        payloads = [
            (frame(b"not a zip"), "closed"),
            (frame(b"", -5), "closed"),
            (frame(b""), "closed"),
            (frame(with_member("../../../stapsrv-hostile", "x")), "closed"),
            (frame(b"x" * 6000), "refused"),
            (frame(request(drop=("sysinfo",))), "refused"),
            (frame(request("-p4", "--tmpdir=/tmp/stapsrv-hostile-tmpdir")), "refused"),
            (frame(request(locale="LANG=$(touch /tmp/pwned)\n")), "compiled"),
            (frame(request()[:50], 4000), "timeout"),
            (b"", "timeout"),
        ]

        def run_all() -> list[RawResult]:
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                futures = [pool.submit(exchange, self.server.port, self.cafile, payload,
                                       timeout=COMPILE_NET) for payload, _ in payloads]
                return [future.result() for future in futures]

        for (payload, expected), result in zip(payloads, await deferToThread(run_all)):
            self.results.append((expected, result))
            if expected == "closed":
                self.assert_closed_without_answer(result)
            elif expected == "timeout":
                self.assert_closed_by_timeout(result)
            elif expected == "refused":
                self.assertEqual(self.answer(result).rc, 1)
            else:
                self.assert_compiled(result)


class ArchiveTests(HostileMixin, TestCase):
    """Request bodies that are not a usable zip archive."""

    async def test_body_not_a_zip(self) -> None:
        await self.assert_unsafe_archive(b"this is not a zip archive\n" * 10,
                                         "Unable to extract client request (File is not a zip file)")

    async def test_truncated_zip(self) -> None:
        body = request()
        await self.assert_unsafe_archive(body[:len(body) // 2],
                                         "Unable to extract client request")

    async def test_zip_with_garbage_central_directory(self) -> None:
        body = bytearray(request())
        end = body.rfind(b"PK\x05\x06")
        offset = struct.unpack_from("<I", body, end + 16)[0]
        body[offset:end] = os.urandom(end - offset)
        await self.assert_unsafe_archive(bytes(body), "Unable to extract client request")

    async def test_empty_zip(self) -> None:
        result = await self.send(build_request({}))
        self.assert_refused(result, "Server: The request is 0 bytes uncompressed; this server "
                            "accepts 1 to 50000 bytes (its --max-request-size).")
        await self.assert_logged("Uncompressed request size of 0 bytes is not within the "
                                 "expected range of 1 to 50000 bytes.")

    async def test_member_dot_dot(self) -> None:
        self.extra_forbidden.append(str(self.server.base / "stapsrv-hostile"))
        await self.assert_unsafe_archive(with_member("../../../stapsrv-hostile", "x"),
                                         "Unsafe member name '../../../stapsrv-hostile'")

    async def test_member_dot_dot_inside_script(self) -> None:
        await self.assert_unsafe_archive(
            with_member("script/../../../../stapsrv-hostile", "x"),
            "Unsafe member name 'script/../../../../stapsrv-hostile'")

    async def test_member_absolute_path(self) -> None:
        await self.assert_unsafe_archive(
            with_member("/tmp/stapsrv-hostile-abs", "x"),
            "Absolute member name '/tmp/stapsrv-hostile-abs'")

    async def test_member_backslash_path(self) -> None:
        await self.assert_unsafe_archive(
            with_member("..\\..\\..\\stapsrv-hostile", "x"), "Unsafe member name")

    async def test_member_symlink_pointing_outside(self) -> None:
        link = Member(b"/etc", mode=stat.S_IFLNK | 0o777)
        await self.assert_unsafe_archive(with_member("script/etc", link),
                                         "Member 'script/etc' is not a regular file")

    async def test_member_symlink_then_file_through_it(self) -> None:
        content = dict(basic_request(HELLO, release=RELEASE))
        content["tapset"] = Member(b"/tmp/stapsrv-hostile-link", mode=stat.S_IFLNK | 0o777)
        content["tapset/x.stp"] = "function f() { return 1 }"
        os.makedirs("/tmp/stapsrv-hostile-link", exist_ok=True)
        self.addCleanup(shutil.rmtree, "/tmp/stapsrv-hostile-link", True)
        self.extra_forbidden.append("/tmp/stapsrv-hostile-link/x.stp")
        await self.assert_unsafe_archive(build_request(content),
                                         "Member 'tapset' is not a regular file")
        self.assertEqual(os.listdir("/tmp/stapsrv-hostile-link"), [])

    async def test_member_character_device(self) -> None:
        device = Member(b"", mode=stat.S_IFCHR | 0o666)
        await self.assert_unsafe_archive(with_member("script/null", device),
                                         "Member 'script/null' is not a regular file")

    async def test_member_block_device(self) -> None:
        device = Member(b"", mode=stat.S_IFBLK | 0o666)
        await self.assert_unsafe_archive(with_member("script/sda", device),
                                         "Member 'script/sda' is not a regular file")

    async def test_member_fifo(self) -> None:
        fifo = Member(b"", mode=stat.S_IFIFO | 0o666)
        await self.assert_unsafe_archive(with_member("argv9", fifo),
                                         "Member 'argv9' is not a regular file")

    async def test_member_socket(self) -> None:
        sock = Member(b"", mode=stat.S_IFSOCK | 0o666)
        await self.assert_unsafe_archive(with_member("script/sock", sock),
                                         "Member 'script/sock' is not a regular file")

    async def test_directory_member_that_is_a_symlink(self) -> None:
        link = Member(b"/etc", mode=stat.S_IFLNK | 0o777)
        await self.assert_unsafe_archive(with_member("script/", link),
                                         "Member 'script/' is not a plain directory")

    async def test_member_name_with_nul(self) -> None:
        entries = [(name.encode(), value.encode())
                   for name, value in basic_request(HELLO, release=RELEASE).items()]
        body = build_request_raw_names(entries + [(b"argv9\x00/../../../x", b"x")])
        names = [info.orig_filename for info in zipfile.ZipFile(io.BytesIO(body)).infolist()]
        self.assertEqual(names[-1], "argv9\x00/../../../x")
        await self.assert_unsafe_archive(body, "Unsafe member name 'argv9\\x00/../../../x'")

    async def test_member_name_with_newline(self) -> None:
        await self.assert_unsafe_archive(with_member("script/a\nb.stp", "x"),
                                         "Unsafe member name 'script/a\\nb.stp'")

    async def test_duplicate_member(self) -> None:
        entries = valid_members()
        entries.append(zip_entry(b"argv1", b"-r../../../.."))
        await self.assert_unsafe_archive(handmade_zip(entries), "Member 'argv1' appears twice")

    async def test_file_then_directory_of_the_same_name(self) -> None:
        content = dict(basic_request(HELLO, release=RELEASE))
        content["script"] = "x"
        content["script/y.stp"] = "x"
        self.assert_refused(await self.send(build_request(content)),
                            "Server: The request holds 'script', which is not one of the "
                            "request members this server accepts")

    async def test_encrypted_member(self) -> None:
        entries = valid_members()
        entries.append(zip_entry(b"script/x.stp", b"probe begin {}", flags=0x1))
        await self.assert_unsafe_archive(handmade_zip(entries),
                                         "Member 'script/x.stp' is encrypted")

    async def test_unsupported_compression_method(self) -> None:
        entries = valid_members()
        entries.append(zip_entry(b"script/x.stp", b"probe begin {}", method=6))
        await self.assert_unsafe_archive(handmade_zip(entries),
                                         "Unable to extract client request")

    async def test_zip_bomb_with_honest_sizes(self) -> None:
        bomb = Member(b"\0" * 4_000_000)
        body = with_member("script/bomb.stp", bomb)
        self.assertLessEqual(len(body), MAX_COMPRESSED)
        result = await self.send(body)
        total = 4_000_000 + sum(len(v) for v in basic_request(HELLO, release=RELEASE).values())
        self.assert_refused(result, f"Server: The request is {total} bytes uncompressed; "
                            "this server accepts 1 to 50000 bytes (its --max-request-size).")

    async def test_zip_bomb_with_lying_sizes(self) -> None:
        data = b"\0" * 4_000_000
        entries = valid_members()
        entries.append(zip_entry(b"script/bomb.stp", data, size=100))
        body = handmade_zip(entries)
        self.assertLessEqual(len(body), MAX_COMPRESSED)
        await self.assert_unsafe_archive(body, "Unable to extract client request")

    async def test_ten_thousand_members_over_the_compressed_limit(self) -> None:
        content = dict(basic_request(HELLO, release=RELEASE))
        for index in range(10_000):
            content[f"script/{index}"] = b""
        body = build_request(content, compression=zipfile.ZIP_STORED)
        result = await self.send(body)
        self.assert_refused(result, f"Server: The request is {len(body)} bytes compressed; "
                            "this server accepts at most 5000 bytes")


class BigLimitArchiveTests(HostileMixin, TestCase):
    """Against a server whose size limits let huge archives through to the
    member checks, and whose compile timeout is short."""

    suite = BIG_SUITE

    async def test_compile_past_the_compile_timeout(self) -> None:
        # Held at the gate in pass 4, the compile never finishes: the
        # timeout ends it on any machine.
        result = await self.send(request("-p4", "-g", script=GATE.get().script("timeout")))
        self.assert_refused(result, "Server: The translator ran longer than the server's "
                            f"compile timeout ({COMPILE_TIMEOUT} s) and was stopped.")
        await self.assert_logged(f"ran past the compile timeout ({COMPILE_TIMEOUT} s); "
                                 "stopping it")

    async def test_ten_thousand_members(self) -> None:
        content = dict(basic_request(HELLO, release=RELEASE))
        for index in range(10_000):
            content[f"script/{index}"] = b""
        result = await self.send(build_request(content, compression=zipfile.ZIP_STORED))
        self.assert_closed_without_answer(result)
        await self.assert_logged(f"Too many members ({10_000 + len(basic_request(HELLO, release=RELEASE))}) "
                                 "in client request; the limit is 4096")

    async def test_arguments_too_long_for_exec(self) -> None:
        # 35 arguments of 100 kB: over the kernel's exec limit (ARG_MAX).
        words = [b"-DX" + b"A" * 100_000 for _ in range(35)]
        result = await self.send(request(*words, "-p4"))
        # Documented (spec §5.3 step 12, handler.py): a translator that
        # cannot be started is logged as "Failed spawning translator" and the
        # client gets no answer, never the server's own traceback.
        if result.data:
            response = parse_response(result.data)
            self.assertEqual(response.modules, [])
            self.assertNotIn("Traceback", response.stderr, "the server's traceback was sent")
            self.assertNotIn("Upon execvpe", response.stderr[:500],
                             "the server's traceback was sent")
        await self.assert_logged("Failed spawning translator")


class RequestTests(HostileMixin, TestCase):
    """Well-formed archives whose contents are hostile."""

    async def test_missing_argv1(self) -> None:
        body = request(drop=("argv1",))
        self.assert_refused(await self.send(body), "A script must be specified.")

    async def test_gap_in_argv_numbering(self) -> None:
        content = dict(basic_request(HELLO, release=RELEASE))
        content["argv4"] = content.pop("argv3")
        self.assert_refused(await self.send(build_request(content)),
                            "A script must be specified.")

    async def test_non_utf8_argv_bytes(self) -> None:
        result = await self.send(request(script=None, argv3=b"-eprobe begin { exit() } # \xff\xfe\x80"))
        self.assert_compiled(result)

    async def test_non_utf8_option_word(self) -> None:
        result = await self.send(request("-p4", "--\xff\xfe".encode("latin-1")))
        self.assert_refused(result, "unrecognized option")

    async def test_argv_with_nul_is_cut(self) -> None:
        result = await self.send(request(script=None, argv3=b"-eprobe begin { exit() }\0-o/etc/x"))
        self.assert_compiled(result)

    async def test_enormous_argv_over_the_request_size(self) -> None:
        result = await self.send(request("-p4", "-D" + "A" * 1_000_000))
        self.assert_refused(result, "bytes uncompressed; this server accepts 1 to 50000 bytes "
                            "(its --max-request-size).")

    async def test_large_argv_within_the_request_size(self) -> None:
        result = await self.send(request("-p4", script="A" * 45_000))
        self.assert_refused(result, "parse error", "Pass 1: parse failed.")

    async def test_script_path_escaping_the_request(self) -> None:
        result = await self.send(request("-p4", "../../../../../../../../etc/passwd",
                                          script=None))
        self.assert_refused(result, "parse error",
                            "at ../../../../../../../../etc/passwd:1:1")

    async def test_absolute_script_path(self) -> None:
        result = await self.send(request("-p4", "/etc/passwd", script=None))
        self.assert_refused(result, "parse error", "at /etc/passwd:1:1")

    async def test_script_path_to_the_server_key(self) -> None:
        # The translator's sandbox has no such file.
        result = await self.send(request("-p4", "../../../ssl/stap-key.pem", script=None))
        response = self.assert_refused(result, "Input file '../../../ssl/stap-key.pem' is "
                                       "missing.", "Pass 1: parse failed.")
        key = (self.server.base / "ssl" / "stap-key.pem").read_text().splitlines()
        for line in key[1:-1]:
            self.assertNotIn(line, response.stderr + response.stdout)

    async def test_tapset_directory_outside_the_request(self) -> None:
        self.assert_compiled(await self.send(request("-p4", "-I", "/etc")))

    async def test_tapset_directory_escaping_the_request(self) -> None:
        self.assert_compiled(await self.send(
            request("-p4", "-I../../../../../../../../etc")))

    async def test_script_outside_the_request_is_not_there(self) -> None:
        # A script file on the server, even one every user may read, does
        # not exist for the translator's sandbox; nothing is cached either,
        # so a change of the file cannot be answered with an old module.
        directory = scratch_directory("hostile-outside-")
        self.addCleanup(remove_tree, directory)
        script = directory / "outside.stp"
        script.write_text(HELLO + "\n")
        script.chmod(0o644)
        body = request("-p4", str(script), script=None)
        self.assert_refused(await self.send(body), f"Input file '{script}' is missing.")
        script.write_text("this is not a script\n")
        self.assert_refused(await self.send(body, label="second"),
                            f"Input file '{script}' is missing.")

    async def test_missing_sysinfo(self) -> None:
        result = await self.send(request(drop=("sysinfo",)))
        self.assert_refused(result, "Server: The request does not name a kernel release "
                            "(its sysinfo is missing or unreadable).")
        await self.assert_logged("Unable to read sysinfo")

    async def test_garbage_sysinfo(self) -> None:
        result = await self.send(request(sysinfo=b"\xff\xfe\x00garbage"))
        self.assert_refused(result, "Server: The request does not name a kernel release")

    async def test_sysinfo_release_with_path(self) -> None:
        result = await self.send(request(sysinfo="sysinfo: ../../../etc x86_64"))
        self.assert_refused(result, "Server: This server does not build modules for kernel "
                            "release '../../../etc'.", "Server: It serves: ")

    async def test_missing_version(self) -> None:
        self.assert_compiled(await self.send(request(drop=("version",))))
        await self.assert_logged("Client version is 1.0")

    async def test_garbage_version(self) -> None:
        self.assert_compiled(await self.send(request(version=b"\xff\xfe\x00 9" * 50)))

    async def test_huge_version_number(self) -> None:
        self.assert_compiled(await self.send(request(version="9" * 5000 + ".1")))

    async def test_locale_with_shell_syntax(self) -> None:
        response = self.assert_compiled(await self.send(
            request(locale="LANG=$(touch /tmp/pwned)\nLC_ALL=`touch /tmp/pwned`\n")))
        self.assertIn("Server: Localization value '$(touch /tmp/pwned)' contains illegal "
                      "characters", response.stderr)
        self.assertIn("Server: Localization value '`touch /tmp/pwned`' contains illegal "
                      "characters", response.stderr)

    async def test_locale_with_ld_preload(self) -> None:
        response = self.assert_compiled(await self.send(
            request(locale="LD_PRELOAD=/tmp/evil.so\nLANG=C\n")))
        self.assertIn("Server: Localization key 'LD_PRELOAD' not found in global list",
                      response.stderr)

    async def test_locale_with_newlines_and_carriage_returns(self) -> None:
        response = self.assert_compiled(await self.send(
            request(locale="LANG=C\nLANG\nLC_ALL=C\r\n\n\nPATH=/tmp\n")))
        for text in ("Server: Localization key=value line 'LANG' cannot be parsed",
                     "Server: Localization value 'C\r' contains illegal characters",
                     "Server: Localization key=value line '' cannot be parsed",
                     "Server: Localization key 'PATH' not found in global list"):
            self.assertIn(text, response.stderr)

    async def test_option_output_file(self) -> None:
        self.assert_compiled(await self.send(request("-p4", "-o", "/etc/x")))

    async def test_option_tmpdir(self) -> None:
        result = await self.send(request("-p4", "--tmpdir=/tmp/stapsrv-hostile-tmpdir"))
        self.assert_refused(result, "ERROR: --tmpdir is invalid with --client-options")

    async def test_option_runtime_directory(self) -> None:
        result = await self.send(request("-p4", "-R", "/tmp"))
        self.assert_refused(result, "ERROR: -R invalid with --client-options")

    async def test_option_build_setting(self) -> None:
        result = await self.send(request("-p4", "-BO=/tmp/stapsrv-hostile-B"))
        self.assert_refused(result, "ERROR: -B invalid with --client-options")

    async def test_option_sign_module_is_dropped(self) -> None:
        self.assert_compiled(await self.send(request("-p4", "--sign-module=/etc")))
        log = await self.assert_logged("Running ['/usr/bin/stap'")
        [line] = [line for line in log.splitlines() if "Running ['/usr/bin/stap'" in line]
        self.assertIn("'--client-options', ", line)
        self.assertNotIn("--sign-module", line)

    async def test_option_command(self) -> None:
        self.assert_compiled(await self.send(request("-p4", "-c", "touch /tmp/pwned")))

    async def test_option_pass_5_with_command(self) -> None:
        result = await self.send(request("-p5", "-c", "touch /tmp/pwned"))
        self.assert_compiled(result)

    async def test_option_release_with_path(self) -> None:
        result = await self.send(request("-p4", "-r../..", script=HELLO))
        self.assert_refused(result, "Safety pattern mismatch for -r parameter from client "
                            "('../..'")

    async def test_option_module_name_with_path(self) -> None:
        result = await self.send(request("-p4", "-m", "../../../tmp/stapsrv-hostile-m"))
        self.assert_refused(result, "Safety pattern mismatch for -m parameter")

    async def test_option_define_with_shell_syntax(self) -> None:
        result = await self.send(request("-p4", "-DFOO=$(touch /tmp/pwned)"))
        self.assert_refused(result, "Safety pattern mismatch for -D parameter")

    async def test_option_sysroot(self) -> None:
        result = await self.send(request("-p4", "--sysroot=/"))
        self.assert_refused(result, "ERROR: --sysroot invalid with --client-options")

    async def test_option_clean_cache(self) -> None:
        result = await self.send(request("-p4", "--clean-cache"))
        self.assert_refused(result, "ERROR: --clean-cache is invalid with --client-options")

    async def test_option_keep_temporary(self) -> None:
        result = await self.send(request("-p4", "-k"))
        self.assert_refused(result, "ERROR: -k invalid with --client-options")

    async def test_option_remote(self) -> None:
        result = await self.send(request("-p4", "--remote=ssh://example"))
        self.assert_refused(result, "ERROR: --remote is invalid with --client-options")

    async def test_unprivileged_embedded_c(self) -> None:
        result = await self.send(request("--privilege=stapusr", "-p4",
                                         script="probe begin { %{ /* */ %} exit() }"))
        self.assert_refused(result, "embedded code in unprivileged script; need stap -g")

    async def test_unprivileged_tapset_directory(self) -> None:
        result = await self.send(request("--privilege=stapusr", "-p4", "-I/etc"))
        self.assert_refused(result, "You can't specify -I when --privilege=stapusr is "
                            "specified.")

    async def test_unknown_privilege(self) -> None:
        result = await self.send(request("--privilege=root", "-p4"))
        self.assert_refused(result, "Invalid argument 'root' for --privilege.")
        await self.assert_logged("Invalid argument 'root' for --privilege")

    async def test_mok_fingerprints_garbage(self) -> None:
        response = self.assert_compiled(await self.send(
            request(mok_fingerprints="garbage\n$(touch /tmp/pwned)\n" + "x" * 3000 + "\n")))
        self.assertIn("Server: MOK fingerprint value 'garbage' isn't in the correct format",
                      response.stderr)
        self.assertIn("Server: MOK fingerprint value '$(touch /tmp/pwned)' isn't in the "
                      "correct format", response.stderr)

    async def test_mok_fingerprint_unknown_to_the_server(self) -> None:
        # As 4.8: the module is built, rc is 1 and the client is sent one
        # of the server's MOK certificates to enroll.
        response = self.answer(await self.send(request(mok_fingerprints="aa:bb:cc\n")))
        self.assertEqual(response.rc, 1, response.stderr)
        self.assertIn("Server: No matching machine owner key (MOK) available on the server "
                      "to sign the\n module.", response.stderr)
        self.assertIn("signing_key.x509", response.members)
