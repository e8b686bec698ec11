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
import subprocess
import time

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import install_fake_stap, require, require_program
from tests.helpers.faults import (
    GONE_NET,
    PASS4_TIMEOUT,
    STILL_SERVING,
    STILL_SERVING_MODULE,
    FaultMixin,
    cafile,
    limits_of,
    processes,
    raw_request,
    small_window_connection,
    unique_script,
)
from tests.helpers.rawclient import CLOSED, RESET, OpenConnection, frame
from tests.helpers.realserver import owned_directory, remove_tree, scratch_directory
from tests.helpers.waiting import NET, pause, poll


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
        once the client goes away mid-compile (the compile waits at a gate,
        so it is still running whatever the machine's speed)."""
        gate = self.gate()
        server = self.start_server(*gate.server_arguments())
        body = raw_request(self.release, gate.script("abandon"), "-p4", "-g")
        connection = await deferToThread(OpenConnection, server.port, cafile(server))
        self.addCleanup(connection.close)
        connection.send(frame(body))
        translator = await self.translator_at_gate(server, gate)
        watch = self.watch(server)
        self.assertTrue(any(proc.comm == "cc1" for proc in watch.session(translator.sid)),
                        "the compiler at the gate is in the translator's session")
        connection.close()
        gone = await poll(lambda: not watch.session(translator.sid), GONE_NET, 0.02)
        self.assertTrue(gone, "translator group still running after the client left: "
                        + ", ".join(map(str, watch.session(translator.sid))))
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
        """SIGKILL to stap in pass 4 (its compiler held at a gate): the
        client's compile fails (nonzero, no module); make/gcc of the dead
        translator do not linger; the server keeps serving."""
        gate = self.gate()
        server = self.start_server(*gate.server_arguments())
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-g", "-m", "killed_mod",
                              "-e", gate.script("killed"))
        translator = await self.translator_at_gate(server, gate)
        os.kill(translator.pid, signal.SIGKILL)
        out, err, code = await result
        # The server answered: what is left of the dead translator's group
        # (make, gcc at the gate, now children of init) must not go on.
        watch = self.watch(server)
        gone = await poll(lambda: not watch.session(translator.sid), GONE_NET, 0.02)
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
        # The fake is a script of this venv's Python and records into the
        # test's directory: outside what a sandbox shows, so this test of the
        # timeout runs without one (the real-compile test below has one).
        server = self.start_server(
            "--compile-timeout", "2", "--no-sandbox",
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
        """A real -p4 whose compiler waits at a gate nobody opens
        (tests/helpers/gate.py) outlives --compile-timeout: rc 1 and the
        message, no module, nothing of the translator's group left.

        The compile can never finish, however fast the machine; how slow
        the machine is decides only where the timeout finds it (at the
        gate in pass 4, or still in passes 1-3 on a loaded machine), and
        the outcome is asserted either way."""
        gate = self.gate()
        # The check afterwards must not need a compile itself: a server
        # without the timeout puts its answer into a response cache the
        # timed server shares (the same -I, so the same keys).  It also
        # makes the guru-mode kernel configuration header (in the server
        # user's shared store), so that the timed server does not spend
        # its timeout on that warm-up.
        cache = owned_directory(scratch_directory("timeout-cache-"))
        self.addCleanup(remove_tree, cache)
        warm = self.start_server(*gate.server_arguments(), "--cache-dir", str(cache))
        await self.assert_still_serves(warm)
        await self.assert_still_serves(warm, arguments=(
            "-g", "-m", STILL_SERVING_MODULE, "-e", STILL_SERVING))
        server = self.start_server("--compile-timeout", str(PASS4_TIMEOUT),
                                   *gate.server_arguments(), "--cache-dir", str(cache))
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-g", "-m", "too_slow",
                              "-e", gate.script("slow"))
        watch = self.watch(server)
        reached = Deferred.fromCoroutine(self.translator_at_gate(server, gate))
        await DeferredList([reached, result], fireOnOneCallback=True, consumeErrors=True)
        out, err, code = await result
        self.assertEqual(code, 1, err.decode())
        self.assertIn(f"compile timeout ({PASS4_TIMEOUT} s)", err.decode())
        self.assertEqual(client.modules(), [])
        if reached.called:
            translator = await reached
            self.assertTrue(watch.ever_ran("make"), "it was in pass 4")
            self.assertEqual(watch.session(translator.sid), [])
        else:
            reached.cancel()
            reached.addErrback(lambda failure: None)
        self.assertTrue(await poll(lambda: not watch.translators() and not self.at_gate(
            server, gate), NET), f"left running: {watch.translators()}")
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
        """SIGTERM with two compiles in pass 4 (both held at a gate, let go
        once the signal is sent): both clients get their modules, the
        server exits 0, nothing is left."""
        gate = self.gate()
        server = self.start_server("--max-threads", "2", *gate.server_arguments())
        clients = [await self.trusted_client(server) for _ in range(2)]
        results = [self.compile(client, server, "-p4", "-g", "-m", f"shutdown_{index}",
                                "-e", gate.script(f"shutdown {index}"))
                   for index, client in enumerate(clients)]
        await gate.reached()
        both = await poll(lambda: len(self.at_gate(server, gate)) == 2, GONE_NET)
        self.assertTrue(both, f"two compilers never waited at the gate together:\n{server.log()}")
        self.assertEqual(len({proc.sid for proc in self.at_gate(server, gate)}), 2,
                         "two translators, each with its compiler at the gate")
        server.process.send_signal(signal.SIGTERM)
        await self.wait_for_log(server, r"Received signal 15, exiting")
        gate.release()
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
        server, and a compile under them succeeds (its compiler is read
        while it waits at a gate, then let go)."""
        gate = self.gate()
        server = self.start_server("--cpu-limit", "600", "--memory-limit", "4000",
                                   "--file-size-limit", "500", "--process-limit", "3000",
                                   *gate.server_arguments())
        client = await self.trusted_client(server)
        result = self.compile(client, server, "-p4", "-g", "-m", "limited",
                              "-e", gate.script("limits"))
        translator = await self.translator_at_gate(server, gate)
        translator_limits = limits_of(translator.pid)
        [compiler] = self.at_gate(server, gate)
        compiler_limits = limits_of(compiler.pid)
        gate.release()
        out, err, code = await result
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["limited.ko"])
        mb = (str(4000 * 1024 * 1024), str(4000 * 1000 * 1000))
        self.assertEqual(translator_limits["Max cpu time"], "600")
        self.assertIn(translator_limits["Max address space"], mb)
        self.assertIn(translator_limits["Max file size"],
                      (str(500 * 1024 * 1024), str(500 * 1000 * 1000)))
        self.assertEqual(translator_limits["Max processes"], "3000")
        self.assertEqual(compiler_limits["Max cpu time"], "600")
        self.assertEqual(compiler_limits["Max processes"], "3000")
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
