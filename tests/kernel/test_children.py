"""Helper programs with a deadline: what they said, or their whole process
group ended at the deadline (real processes; the deadline is the only clock,
and only a program that cannot end by itself is ever timed out)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.process import ProcessReader
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.core.programs import STORE_NICENESS
from stapsrv.kernel.children import ChildTimedOut, run_child
from stapsrv.kernel.fetch import FetchFailed, KernelFetcher
from stapsrv.kernel.store import KernelStore
from stapsrv.reactor import IHandlerReactor
from tests.helpers.waiting import NET, is_dead, poll

reactor = cast(IHandlerReactor, global_reactor)
ENV = {"PATH": "/usr/bin:/bin"}


class RunChildTests(TestCase):
    async def test_output_errors_and_exit_code(self) -> None:
        self.assertEqual(
            await run_child(reactor, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
                            ENV, NET),
            (b"out\n", b"err\n", 3))

    async def test_store_work_yields_to_compiles(self) -> None:
        # Its CPU priority is STORE_NICENESS below the server's own.
        out, _, code = await run_child(
            reactor, ["/bin/sh", "-c", "cut -d' ' -f19 /proc/self/stat"], ENV, NET)
        self.assertEqual(code, 0)
        self.assertEqual(int(out), min(19, os.nice(0) + STORE_NICENESS))

    async def test_a_signal_is_128_plus_its_number(self) -> None:
        self.assertEqual((await run_child(reactor, ["/bin/sh", "-c", "kill -9 $$"], ENV, NET))[2],
                         128 + 9)

    async def test_output_is_kept_up_to_the_cap(self) -> None:
        out, _, code = await run_child(reactor, ["/bin/sh", "-c", "head -c 100000 /dev/zero"],
                                       ENV, NET, cap=1000)
        self.assertEqual((out, code), (b"\0" * 1000, 0))

    async def test_past_the_deadline_the_whole_pipeline_is_stopped(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        pids = base / "pids"
        script = f"sleep 300 | cat & echo $! > {pids}; wait"
        with self.assertRaises(ChildTimedOut) as raised:
            await run_child(reactor, ["/bin/sh", "-c", script], ENV, 0.5, cwd=base)
        self.assertEqual(str(raised.exception), "sh did not finish within 0.5 s and was stopped")
        [cat] = map(int, pids.read_text().split())
        self.assertTrue(await poll(lambda: is_dead(cat), NET), "the pipeline's cat is gone")


    async def test_a_cancelled_run_ends_its_group(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        pids = base / "pids"
        running = Deferred.fromCoroutine(run_child(
            reactor, ["/bin/sh", "-c", f"sleep 300 & echo $! > {pids}; wait"], ENV, NET))
        self.assertTrue(await poll(lambda: pids.exists() and pids.read_text().strip(), NET))
        running.cancel()
        with self.assertRaises(CancelledError):
            await running
        [sleep] = map(int, pids.read_text().split())
        self.assertTrue(await poll(lambda: is_dead(sleep), NET), "its sleep is gone")
        # And the shell: its pipes close and it is reaped soon after.
        self.assertTrue(await poll(lambda: not [
            reader for reader in global_reactor.getReaders()  # type: ignore[attr-defined]
            if isinstance(reader, ProcessReader)], NET))


class FetcherStepTests(TestCase):
    async def test_a_step_that_hangs_fails_the_fetch_clearly(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        pool = ThreadPool(0, 1)
        pool.start()
        self.addCleanup(pool.stop)
        fetcher = KernelFetcher(KernelStore(base / "kernels", 1 << 20), reactor, pool, ("*",),
                                environ=ENV, step_timeout=0.5)
        with self.assertRaises(FetchFailed) as raised:
            await fetcher.run(["/usr/bin/sleep", "300"])
        self.assertEqual(str(raised.exception),
                         "sleep did not finish within 0.5 s and was stopped")
