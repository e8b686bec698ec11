"""Servers under watch for the fault tests: their processes, their
leftovers, and whether they still serve."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from attrs import frozen
from twisted.internet.defer import Deferred

from tests.helpers.rawclient import basic_request, build_request, client_context
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import (
    Client,
    ServerProcess,
    remove_tree,
    scratch_directory,
    start_stapsrv,
)
from tests.helpers.waiting import NET, poll

if TYPE_CHECKING:
    from tests.helpers.gate import CompileGate


#: What every post-fault check compiles (answered from a cache after its
#: first compile on a machine: the point is that the server still answers).
STILL_SERVING = 'probe begin { println("still serving"); exit() }'
STILL_SERVING_MODULE = "still_serving"
#: Seconds a post-fault leftover (process or scratch directory) may linger.
LINGER = 2.0
#: How long a test waits for a process group to go (see waiting.NET).
GONE_NET = NET
#: A --compile-timeout far longer than passes 1-3 of a one-line script
#: take, for compiles held at a gate in pass 4 (tests/helpers/gate.py).
PASS4_TIMEOUT = 15


def unique_script(tag: str) -> str:
    """A script no cache has seen: the translator must really run."""
    return f'probe begin {{ println("{tag} {uuid.uuid4().hex}"); exit() }}'


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
        """The server's running translators: its children that lead a session
        of their own (``stap`` itself, or the ``bwrap`` of its sandbox)."""
        return [proc for proc in self.belonging()
                if proc.ppid == self.server_pid and proc.comm in ("stap", "bwrap")
                and proc.sid == proc.pid and proc.state != "Z"]

    def session(self, sid: int) -> list[Proc]:
        """The live processes of session ``sid``."""
        return [proc for proc in processes().values() if proc.sid == sid and proc.state != "Z"]

    def forget(self) -> None:
        """Start afresh: what ran before (the server's warm-up) is forgotten."""
        with self._lock:
            self.seen.clear()

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


def wait_for_warm_up(server: ServerProcess, release: str, timeout: float = 180.0) -> None:
    """Block until a sandboxed server's start-up compile for ``release`` is
    over, so that the translator a test watches is its request's own."""
    done = re.compile(rf"(Kernel configuration header for {re.escape(release)} ready"
                      rf"|The warm-up compile for kernel {re.escape(release)})")
    deadline = time.monotonic() + timeout
    while not done.search(server.log()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no warm-up compile ended within {timeout} s:\n{server.log()}")
        time.sleep(0.1)


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
        if "--no-sandbox" not in arguments:
            wait_for_warm_up(server, self.release)
            watch.forget()
        return server

    def watch(self, server: ServerProcess) -> ProcessWatch:
        return self.watches[server.pid]

    def gate(self) -> "CompileGate":
        """A compile gate of this test's own (tests/helpers/gate.py)."""
        from tests.helpers.gate import CompileGate
        base = scratch_directory("gate-")
        self.addCleanup(remove_tree, base)  # type: ignore[attr-defined]
        gate = CompileGate(base)
        self.addCleanup(gate.close)  # type: ignore[attr-defined]
        return gate

    def at_gate(self, server: ServerProcess, gate: "CompileGate") -> list[Proc]:
        """The server's translator processes waiting at ``gate``."""
        holders = set(gate.holders())
        return [proc for proc in self.watch(server).belonging() if proc.pid in holders]

    async def translator_at_gate(self, server: ServerProcess, gate: "CompileGate") -> Proc:
        """Wait until a compile of ``server`` is at ``gate``; its translator
        (the leader of the compiler's session: ``stap``, or the ``bwrap``
        of its sandbox).  Not just any translator: a guru-mode request
        first makes the server build its guru kernel configuration
        header, in a translator of its own."""
        await gate.reached()
        [compiler] = self.at_gate(server, gate)
        [leader] = [proc for proc in self.watch(server).belonging() if proc.pid == compiler.sid]
        return leader

    def compile(self, client: Client, server: ServerProcess, *arguments: str
                ) -> Deferred[tuple[bytes, bytes, int]]:
        return client.stap(f"--use-server={server.spec}", "-r", self.release, *arguments)

    async def translator_started(self, server: ServerProcess, timeout: float = 60.0) -> Proc:
        watch = self.watch(server)
        found = await poll(watch.translators, timeout)
        if not found:
            raise AssertionError(f"no translator started within {timeout} s\n{server.log()}")
        return found[0]

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
            raise AssertionError(
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
