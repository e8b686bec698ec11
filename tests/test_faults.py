"""Faults a compile server meets in service, against real servers.

Each test starts its own ``twistd stap-server`` (as the unprivileged test
user, on loopback; see ``tests/realserver.py``), breaks something the way it
breaks in real life (a client that goes away, a translator that dies or
hangs, a full scratch filesystem, a shutdown under load) and checks what a
user or an admin would check: what the real ``stap`` client prints and
returns, and afterwards that

* a real client compile against the same server still succeeds,
* no process of the server's translators is left (a background thread
  records the session of every child the server starts -- each translator
  runs in a session of its own -- so make/gcc orphans are found even after
  their parent died), and
* the server's ``TMPDIR`` holds no ``stap-server.*`` scratch directory.

Where the translator must really run, the scripts are unique (a fresh
``println`` text), so neither the translator's cache nor the server's
response cache can answer them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from attrs import frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import install_fake_stap, require, require_program
from tests.rawclient import (
    CLOSED,
    RESET,
    OpenConnection,
    basic_request,
    build_request,
    client_context,
    frame,
)
from tests.realserver import (
    Client,
    ServerProcess,
    owned_directory,
    remove_tree,
    scratch_directory,
    start_stapsrv,
)
from tests.test_service import RealClientMixin

T = TypeVar("T")

#: What every post-fault check compiles (answered from a cache after its
#: first compile on a machine: the point is that the server still answers).
STILL_SERVING = 'probe begin { println("still serving"); exit() }'
STILL_SERVING_MODULE = "still_serving"
#: Seconds a post-fault leftover (process or scratch directory) may linger.
LINGER = 2.0


def unique_script(tag: str) -> str:
    """A script no cache has seen: the translator must really run."""
    return f'probe begin {{ println("{tag} {uuid.uuid4().hex}"); exit() }}'


def heavy_script(tag: str, functions: int = 20) -> str:
    """A new script whose pass 4 takes several seconds (gcc time grows
    faster than linearly with the number of functions: 1 takes ~3 s in
    all, 20 ~5 s, 150 over a minute on the 2-core CI machine); passes 1-3
    take well under a second."""
    body = "".join(f'function f{index}(x) {{ return x * {index} + '
                   f'strlen(sprintf("%d-{index}", x)) }}\n' for index in range(functions))
    calls = " + ".join(f"f{index}({index})" for index in range(functions))
    return body + f'probe begin {{ println({calls}, " {tag} {uuid.uuid4().hex}"); exit() }}'


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """``predicate()`` once it is true, or its last (false) value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        await pause(interval)


# ---------------------------------------------------------------------------
# Raw requests (tests/rawclient.py speaks the bytes of protocol.md section 3).


def raw_request(release: str, script: str, *args: str) -> bytes:
    """A request archive for ``-p… -eSCRIPT``, as the 4.8 client builds it."""
    return build_request(basic_request(script, release=release, args=args))


def cafile(server: ServerProcess) -> Path:
    return server.base / "ssl" / "stap.cert"


def small_window_connection(server: ServerProcess, receive_buffer: int = 4096) -> ssl.SSLSocket:
    """A TLS connection whose receive buffer (set before connecting, so the
    advertised window stays small) holds only a few KiB of an answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(120.0)
    try:
        sock.connect(("127.0.0.1", server.port))
        return client_context(cafile(server)).wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


# ---------------------------------------------------------------------------
# Processes of a server, from /proc.


@frozen
class Proc:
    pid: int
    comm: str
    state: str
    ppid: int
    sid: int

    def __str__(self) -> str:
        return f"{self.pid} {self.comm} (state {self.state}, parent {self.ppid}, session {self.sid})"


def processes() -> dict[int, Proc]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        found[int(entry)] = Proc(int(entry), comm, fields[0], int(fields[1]), int(fields[3]))
    return found


def descends_from(procs: dict[int, Proc], pid: int, ancestor: int) -> bool:
    seen = set()
    while pid in procs and pid not in seen:
        seen.add(pid)
        pid = procs[pid].ppid
        if pid == ancestor:
            return True
    return False


def limits_of(pid: int) -> dict[str, str]:
    """``/proc/PID/limits`` as {name: soft limit}."""
    rows = {}
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits.readlines()[1:]:
            match = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if match:
                rows[match.group(1)] = match.group(2)
    return rows


class ProcessWatch:
    """Samples /proc in a thread and remembers the session of every process
    the server started, so that what is left of a translator can be found
    once its leader (or the server) is gone."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.sessions = {server_pid}
        self.seen: dict[int, Proc] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{server_pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.03):
            self.sample()

    def sample(self) -> dict[int, Proc]:
        procs = processes()
        with self._lock:
            for proc in procs.values():
                if proc.pid == self.server_pid:
                    continue
                if proc.sid in self.sessions or descends_from(procs, proc.pid, self.server_pid):
                    self.sessions.add(proc.sid)
                    self.seen.setdefault(proc.pid, proc)
        return procs

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def belonging(self) -> list[Proc]:
        """Processes of the server's translators right now: live ones, and
        zombies the server has not reaped (a zombie handed to init is
        init's business)."""
        procs = self.sample()
        with self._lock:
            sessions = set(self.sessions)
        return [proc for proc in procs.values() if proc.pid != self.server_pid
                and (proc.sid in sessions or descends_from(procs, proc.pid, self.server_pid))
                and (proc.state != "Z" or proc.ppid == self.server_pid)]

    def translators(self) -> list[Proc]:
        """The server's running ``stap`` children (each leads its own session)."""
        return [proc for proc in self.belonging()
                if proc.ppid == self.server_pid and proc.comm == "stap"
                and proc.sid == proc.pid and proc.state != "Z"]

    def session(self, sid: int) -> list[Proc]:
        """The live processes of session ``sid``."""
        return [proc for proc in processes().values() if proc.sid == sid and proc.state != "Z"]

    def ever_ran(self, name: str) -> bool:
        with self._lock:
            return any(proc.comm == name for proc in self.seen.values())

    def end_leftovers(self) -> None:
        """Cleanup: SIGKILL what a failed test left (our server's children only)."""
        for proc in self.belonging():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------


class FaultMixin(RealClientMixin):
    """Servers with a process watch, trusted real clients, post-fault checks."""

    timeout = 300

    def setUp(self) -> None:
        super().setUp()
        self.watches: dict[int, ProcessWatch] = {}

    def start_server(self, *arguments: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_stapsrv(arguments, release=self.release, env=env, wait=False)
        self.addCleanup(remove_tree, server.base)  # type: ignore[attr-defined]
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        watch = ProcessWatch(server.pid)
        self.watches[server.pid] = watch
        self.addCleanup(watch.end_leftovers)  # type: ignore[attr-defined]
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        server.wait_for_port()
        return server

    def watch(self, server: ServerProcess) -> ProcessWatch:
        return self.watches[server.pid]

    def compile(self, client: Client, server: ServerProcess, *arguments: str
                ) -> Deferred[tuple[bytes, bytes, int]]:
        return client.stap(f"--use-server={server.spec}", "-r", self.release, *arguments)

    async def translator_started(self, server: ServerProcess, timeout: float = 60.0) -> Proc:
        watch = self.watch(server)
        found = await poll(watch.translators, timeout)
        if not found:
            raise AssertionError(f"no translator started within {timeout} s\n{server.log()}")
        return found[0]

    async def compiler_running(self, server: ServerProcess, translator: Proc,
                               timeout: float = 60.0) -> None:
        """Wait until the translator's make or compiler runs (pass 4)."""
        watch = self.watch(server)

        def compiling() -> bool:
            return any(proc.comm in ("cc1", "make", "gcc-12", "gcc")
                       for proc in watch.session(translator.sid))

        if not await poll(compiling, timeout):
            raise AssertionError(f"translator {translator} never reached make/gcc")

    async def wait_for_log(self, server: ServerProcess, pattern: str, timeout: float = 30.0) -> str:
        match = await poll(lambda: re.search(pattern, server.log()), timeout)
        if not match:
            raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{server.log()}")
        return match.group(0)

    async def assert_no_leftovers(self, server: ServerProcess, tmpdir: Path | None = None,
                                  linger: float = LINGER) -> None:
        """No translator process and no scratch directory of ``server`` left
        (after at most ``linger`` seconds)."""
        watch = self.watch(server)
        left = await poll(lambda: not watch.belonging(), linger)
        if not left:
            remaining = "\n".join(map(str, watch.belonging()))
            raise AssertionError(  # type: ignore[misc]
                f"processes of the server's translators are left:\n{remaining}")
        tmpdir = tmpdir or server.base / "tmp"

        def scratch() -> list[str]:
            return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("stap-server."))

        if not await poll(lambda: not scratch(), linger):
            raise AssertionError(f"scratch directories left in {tmpdir}: {scratch()}")
        for log in (server.log(), server.log(server.base / "twistd.log")):
            self.assertNotIn("Traceback", log)  # type: ignore[attr-defined]

    async def assert_still_serves(self, server: ServerProcess, client: Client | None = None,
                                  arguments: Sequence[str] = ("-m", STILL_SERVING_MODULE,
                                                              "-e", STILL_SERVING),
                                  module: str = STILL_SERVING_MODULE + ".ko",
                                  tmpdir: Path | None = None) -> None:
        """The aftermath check: no leftovers, a real -p4 compile works, still
        no leftovers."""
        await self.assert_no_leftovers(server, tmpdir)
        self.assertIsNone(server.exit_code, "the server is still running")  # type: ignore[attr-defined]
        client = client or await self.trusted_client(server)
        for name in client.modules():
            (client.cwd / name).unlink()
        out, err, code = await self.compile(client, server, "-p4", *arguments)
        self.assertEqual(code, 0, err.decode())  # type: ignore[attr-defined]
        self.assertEqual(client.modules(), [module])  # type: ignore[attr-defined]
        await self.assert_no_leftovers(server, tmpdir)


class DisconnectTests(FaultMixin, TestCase):
    async def test_client_disconnects_during_upload(self) -> None:
        """Half a request, then the client goes away: nothing is compiled,
        the short read is logged, nothing is left."""
        server = self.start_server()
        body = raw_request(self.release, unique_script("upload"), "-p4")
        half = len(body) // 2
        connection = await deferToThread(OpenConnection, server.port, cafile(server))
        connection.send(frame(body)[:4 + half])
        await pause(0.3)
        connection.close()
        await self.wait_for_log(
            server, rf"Expected {len(body)} bytes, got {half} while reading client request")
        self.assertFalse(self.watch(server).ever_ran("stap"))
        await self.assert_still_serves(server)

    async def test_client_disconnects_during_compilation(self) -> None:
        """The translator's whole process group (stap, make, gcc) is ended
        within about a second of the client going away."""
        server = self.start_server()
        body = raw_request(self.release, unique_script("abandon"), "-p4")
        connection = await deferToThread(OpenConnection, server.port, cafile(server))
        self.addCleanup(connection.close)
        connection.send(frame(body))
        translator = await self.translator_started(server)
        await self.compiler_running(server, translator)
        self.assertTrue(self.watch(server).session(translator.sid))
        closed = time.monotonic()
        connection.close()
        watch = self.watch(server)
        gone = await poll(lambda: not watch.session(translator.sid), 5.0, 0.02)
        elapsed = time.monotonic() - closed
        self.assertTrue(gone, "translator group still running 5 s after the client left: "
                        + ", ".join(map(str, watch.session(translator.sid))))
        self.assertLess(elapsed, 1.5, f"translator group took {elapsed:.2f} s to go")
        await self.assert_still_serves(server)

    async def test_client_disconnects_during_download(self) -> None:
        """The client reads the first bytes of a big (-p4, with build files)
        response through a tiny receive window and goes away."""
        server = self.start_server()
        body = raw_request(self.release, unique_script("download"), "-p4")
        connection = await deferToThread(small_window_connection, server)
        self.addCleanup(connection.close)
        connection.sendall(frame(body))
        first = await deferToThread(connection.recv, 1024)  # waits for the answer
        self.assertTrue(first.startswith(b"PK"), first[:20])
        connection.close()
        await self.assert_still_serves(server)

    async def test_client_never_reads_the_response(self) -> None:
        """The client sends a request and closes at once, before any answer."""
        server = self.start_server()
        body = raw_request(self.release, unique_script("noread"), "-p2")
        connection = await deferToThread(OpenConnection, server.port, cafile(server))
        connection.send(frame(body))
        connection.close()
        await self.wait_for_log(server, r"Accepted connection")
        await self.assert_still_serves(server)


class RequestTimeoutTests(FaultMixin, TestCase):
    async def test_stalled_connections_are_closed(self) -> None:
        """With --request-timeout 2, a connection that never does the TLS
        handshake, one that handshakes and sends nothing and one that stops
        half-way through its upload are all closed after about 2 s."""
        server = self.start_server("--request-timeout", "2")
        plain = await deferToThread(OpenConnection, server.port, None, tls=False)
        idle = await deferToThread(OpenConnection, server.port, cafile(server))
        stalled = await deferToThread(OpenConnection, server.port, cafile(server))
        body = raw_request(self.release, unique_script("stall"), "-p2")
        stalled.send(frame(body)[:4 + len(body) // 2])
        connections = {"no handshake": plain, "idle TLS": idle, "half upload": stalled}
        for connection in connections.values():
            self.addCleanup(connection.close)
        results = await gatherResults([deferToThread(c.result, 15.0)
                                       for c in connections.values()])
        for name, result in zip(connections, results):
            self.assertIn(result.outcome, (CLOSED, RESET), f"{name}: {result}")
            self.assertGreater(result.elapsed, 1.5, f"{name} cut off too early")
            self.assertLess(result.elapsed, 6.0, f"{name} cut off too late")
            self.assertEqual(result.data, b"", name)
        self.assertFalse(self.watch(server).ever_ran("stap"))
        await self.assert_still_serves(server)


class TranslatorKilledTests(FaultMixin, TestCase):
    async def test_translator_killed_by_a_signal(self) -> None:
        """SIGKILL to stap in pass 4: the client's compile fails (nonzero,
        no module); make/gcc of the dead translator do not linger; the
        server keeps serving."""
        server = self.start_server()
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-m", "killed_mod",
                              "-e", unique_script("killed"))
        translator = await self.translator_started(server)
        await self.compiler_running(server, translator)
        os.kill(translator.pid, signal.SIGKILL)
        out, err, code = await result
        # The server answered: what is left of the dead translator's group
        # (make, gcc, now children of init) must not go on compiling.
        watch = self.watch(server)
        gone = await poll(lambda: not watch.session(translator.sid), 0.5, 0.02)
        left = ", ".join(map(str, watch.session(translator.sid)))
        self.assertNotEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), [])
        self.assertIn("Passes: via server failed.", err.decode())
        self.assertTrue(gone, f"the dead translator's make/gcc still run after the answer: {left}")
        await self.assert_still_serves(server, client)


class CompileTimeoutTests(FaultMixin, TestCase):
    async def test_slow_fake_translator_is_ended(self) -> None:
        """A translator (tests/fakestap.py ``sleep``: itself and a child
        sleeping 300 s) outlives --compile-timeout 2: the client gets rc 1
        and the message within the timeout plus the SIGKILL grace; both
        processes are gone."""
        place = scratch_directory("fakestap-")
        self.addCleanup(remove_tree, place)
        stap = install_fake_stap(place)
        record = place / "record.json"
        server = self.start_server(
            "--compile-timeout", "2",
            env={"SYSTEMTAP_STAP": str(stap), "FAKESTAP_RECORD": str(record)})
        client = await self.trusted_client(server)
        start = time.monotonic()
        out, err, code = await self.compile(client, server, "-p4", "-e", "sleep")
        elapsed = time.monotonic() - start
        self.assertEqual(code, 1, err.decode())
        self.assertIn("compile timeout", err.decode())
        self.assertEqual(client.modules(), [])
        self.assertGreater(elapsed, 1.9)
        self.assertLess(elapsed, 10.0)
        pids = (place / "record.json.pids").read_text()
        live = {proc.pid for proc in processes().values() if proc.state != "Z"}
        for pid in map(int, re.findall(r"\d+", pids)):
            self.assertNotIn(pid, live)
        await self.assert_still_serves(server, client, ("-e", "ok"), "stap_fake_1.ko")

    async def test_real_compile_over_the_timeout_is_ended(self) -> None:
        """A real -p4 of a new script whose gcc runs for several seconds,
        with --compile-timeout 2 (pass 4 starts within a second): rc 1 and
        the message, no make/gcc left."""
        # The check afterwards must not need a compile itself (a cold one
        # takes longer than 2 s): a server without the timeout puts its
        # answer into a response cache the timed server shares.
        cache = owned_directory(scratch_directory("timeout-cache-"))
        self.addCleanup(remove_tree, cache)
        warm = self.start_server("--cache-dir", str(cache))
        await self.assert_still_serves(warm)
        server = self.start_server("--compile-timeout", "2", "--cache-dir", str(cache))
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-m", "too_slow",
                              "-e", heavy_script("slow"))
        translator = await self.translator_started(server)
        out, err, code = await result
        self.assertEqual(code, 1, err.decode())
        self.assertIn("compile timeout", err.decode())
        self.assertEqual(client.modules(), [])
        self.assertTrue(self.watch(server).ever_ran("make"), "the timeout hit pass 4")
        self.assertEqual(self.watch(server).session(translator.sid), [])
        await self.assert_still_serves(server, client)


class DiskFullTests(FaultMixin, TestCase):
    SIZE = 4 * 1024 * 1024

    def setUp(self) -> None:
        super().setUp()
        require(os.geteuid() == 0, "mounting a small tmpfs needs root")
        require_program("mount")
        base = scratch_directory("tmpfs-")
        self.addCleanup(remove_tree, base)
        self.mountpoint = base / "mnt"
        self.mountpoint.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=1777", "tmpfs",
                        str(self.mountpoint)], check=True)
        self.addCleanup(self._unmount)
        self.filler = self.mountpoint / "filler"

    def _unmount(self) -> None:
        if subprocess.run(["umount", str(self.mountpoint)]).returncode != 0:
            subprocess.run(["umount", "-l", str(self.mountpoint)])

    def fill(self, leave: int = 0) -> None:
        """Fill the tmpfs (as root), then give back ``leave`` bytes."""
        chunk = b"\0" * 65536
        with open(self.filler, "wb") as out:
            try:
                while True:
                    out.write(chunk)
                    out.flush()
            except OSError:
                pass
        with open(self.filler, "r+b") as out:
            out.truncate(max(0, self.filler.stat().st_size - leave))

    async def disk_full_then_freed(self, leave: int) -> None:
        server = self.start_server(env={"TMPDIR": str(self.mountpoint)})
        client = await self.trusted_client(server)
        self.fill(leave)
        out, err, code = await self.compile(client, server, "-p4", "-m", "no_room",
                                            "-e", unique_script("full"))
        self.assertEqual(code, 1, err.decode())
        self.assertIn("ran out of disk space", err.decode())
        self.assertEqual(client.modules(), [])
        await self.assert_no_leftovers(server, self.mountpoint)
        self.filler.unlink()
        out, err, code = await self.compile(client, server, "-p4", "-m", "room_again",
                                            "-e", unique_script("freed"))
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["room_again.ko"])
        await self.assert_still_serves(server, client, tmpdir=self.mountpoint)

    async def test_scratch_filesystem_full(self) -> None:
        """TMPDIR completely full: the request cannot even be stored."""
        await self.disk_full_then_freed(leave=0)

    async def test_scratch_filesystem_fills_during_compile(self) -> None:
        """256 KiB left: the request unpacks, the build (about 1 MB of
        intermediates) runs out of space half-way."""
        await self.disk_full_then_freed(leave=256 * 1024)


class ShutdownTests(FaultMixin, TestCase):
    async def test_sigterm_while_two_compiles_run(self) -> None:
        """SIGTERM with two compiles in pass 4: both clients get their
        modules, the server exits 0, nothing is left."""
        server = self.start_server("--max-threads", "2")
        clients = [await self.trusted_client(server) for _ in range(2)]
        results = [self.compile(client, server, "-p4", "-m", f"shutdown_{index}",
                                "-e", unique_script(f"shutdown {index}"))
                   for index, client in enumerate(clients)]
        watch = self.watch(server)
        two = await poll(lambda: len(watch.translators()) == 2, 60.0)
        self.assertTrue(two, f"two translators never ran together:\n{server.log()}")
        server.process.send_signal(signal.SIGTERM)
        outcomes = await gatherResults(results)
        for index, (client, (out, err, code)) in enumerate(zip(clients, outcomes)):
            self.assertEqual(code, 0, err.decode())
            self.assertEqual(client.modules(), [f"shutdown_{index}.ko"])
        status = await deferToThread(server.process.wait, 60)
        shutdown = [line for line in server.log().splitlines()
                    if re.search(r"signal|outstanding|Timeout|exiting|complete", line)]
        self.assertEqual(status, 0, "exit status of a clean shutdown (4.8 exits 0); log:\n"
                         + "\n".join(shutdown) + "\n" + server.output())
        await self.assert_no_leftovers(server)


class ResourceLimitTests(FaultMixin, TestCase):
    async def test_limits_reach_the_translator_and_its_compilers(self) -> None:
        """Generous limits are set on stap (and inherited by gcc), not on the
        server, and a compile under them succeeds."""
        server = self.start_server("--cpu-limit", "600", "--memory-limit", "4000",
                                   "--file-size-limit", "500", "--process-limit", "3000")
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-m", "limited",
                              "-e", unique_script("limits"))
        translator = await self.translator_started(server)
        translator_limits = limits_of(translator.pid)
        await self.compiler_running(server, translator)
        compiler = next((p for p in self.watch(server).session(translator.sid)
                         if p.comm in ("make", "cc1", "gcc-12")), None)
        try:
            compiler_limits = limits_of(compiler.pid) if compiler else None
        except OSError:  # it finished in between
            compiler_limits = None
        out, err, code = await result
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["limited.ko"])
        mb = (str(4000 * 1024 * 1024), str(4000 * 1000 * 1000))
        self.assertEqual(translator_limits["Max cpu time"], "600")
        self.assertIn(translator_limits["Max address space"], mb)
        self.assertIn(translator_limits["Max file size"],
                      (str(500 * 1024 * 1024), str(500 * 1000 * 1000)))
        self.assertEqual(translator_limits["Max processes"], "3000")
        if compiler_limits is not None:
            self.assertEqual(compiler_limits["Max cpu time"], "600")
        ours = limits_of(os.getpid())
        theirs = limits_of(server.pid)
        for name in ("Max cpu time", "Max address space", "Max file size", "Max processes"):
            self.assertEqual(theirs[name], ours[name], f"the server's own {name}")
        await self.assert_no_leftovers(server)

    async def test_memory_limit_fails_the_compile(self) -> None:
        """--memory-limit 32: stap needs well over 100 MB of address space
        even for pass 2 (measured: it fails at 98 MB, runs at 195 MB), so it
        deterministically dies with its 'Out of memory' message.  The same
        request to a server without limits compiles."""
        script = unique_script("memory")
        server = self.start_server("--memory-limit", "32")
        client = await self.trusted_client(server)
        out, err, code = await self.compile(client, server, "-p4", "-m", "memory_mod",
                                            "-e", script)
        self.assertNotEqual(code, 0)
        self.assertIn("Out of memory", err.decode())
        self.assertEqual(client.modules(), [])
        await self.assert_no_leftovers(server)
        unlimited = self.start_server()
        client = await self.trusted_client(unlimited)
        out, err, code = await self.compile(client, unlimited, "-p4", "-m", "memory_mod",
                                            "-e", script)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["memory_mod.ko"])

    async def test_process_limit_fails_the_compile(self) -> None:
        """--process-limit 1: RLIMIT_NPROC counts every process of the
        server user, which already runs the server and stap itself, so
        stap's first fork (make, in pass 4) fails, whatever else runs."""
        server = self.start_server("--process-limit", "1")
        client = await self.trusted_client(server)
        out, err, code = await self.compile(client, server, "-p4", "-m", "nproc_mod",
                                            "-e", unique_script("nproc"))
        self.assertNotEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), [])
        self.assertFalse(self.watch(server).ever_ran("cc1"))
        await self.assert_no_leftovers(server)
