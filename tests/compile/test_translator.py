"""The translator launcher: limits, process group, parent-death signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stapsrv.compile.sandbox import Sandbox, StapconfStore
from stapsrv.compile.translator import launcher, live_group_members, start_translator
from stapsrv.config.values import TranslatorLimits
from tests.helpers import ROOT, require_program


class LauncherTests(TestCase):
    def run_shell(self, script: str, limits: TranslatorLimits = TranslatorLimits()):  # type: ignore[no-untyped-def]
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        run = start_translator(reactor, ["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"},
                               base, base / "stdout", base / "stderr", limits)
        return run, base

    async def test_limits_apply_to_the_translator_and_its_children(self) -> None:
        limits = TranslatorLimits(cpu_seconds=7, address_space=900 << 20,
                                  file_size=3 << 20, processes=321)
        run, base = self.run_shell(
            "sh -c 'ulimit -t; ulimit -v; ulimit -f; cat /proc/self/limits' ", limits)
        self.assertEqual(await run.result, 0)
        lines = (base / "stdout").read_text().splitlines()
        self.assertEqual(lines[:3], ["7", str(900 << 10), str((3 << 20) // 512)])
        limits_text = "\n".join(lines[3:])
        self.assertRegex(limits_text, r"Max processes\s+321\s+321")
        self.assertRegex(limits_text, r"Max cpu time\s+7\s+7", "hard limit too")

    async def test_output_cut_at_the_limit_and_the_translator_stopped(self) -> None:
        """A flood on stdout: the file keeps the first ``output_limit`` bytes,
        the translator is stopped rather than left writing; stderr, under
        the limit, is whole."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        (base / "stderr").write_bytes(b"before\n")
        run = start_translator(reactor, ["/bin/sh", "-c", "echo to-stderr >&2; exec yes"],
                               {"PATH": "/usr/bin:/bin"}, base, base / "stdout",
                               base / "stderr", TranslatorLimits(), output_limit=1 << 20)
        status = await run.result  # yes never ends by itself: only the cut does
        self.assertEqual(status, 128 + signal.SIGTERM)
        self.assertEqual(run.cut_output, (1,))
        self.assertEqual((base / "stdout").read_bytes(), b"y\n" * (1 << 19))
        self.assertEqual((base / "stderr").read_bytes(), b"before\nto-stderr\n")

    async def test_output_under_the_limit_is_whole(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        run = start_translator(reactor, ["/bin/sh", "-c", "head -c 100000 /dev/zero"],
                               {"PATH": "/usr/bin:/bin"}, base, base / "stdout",
                               base / "stderr", TranslatorLimits(), output_limit=100000)
        self.assertEqual(await run.result, 0)
        self.assertEqual(run.cut_output, ())
        self.assertEqual((base / "stdout").stat().st_size, 100000)

    async def test_the_servers_original_descriptor_limit_is_given_back(self) -> None:
        import resource
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = TranslatorLimits(open_files=(256, hard))
        self.assertIn(f"--nofile=256:{'unlimited' if hard == resource.RLIM_INFINITY else hard}",
                      launcher(limits))
        run, base = self.run_shell("sh -c 'ulimit -n'", limits)
        self.assertEqual(await run.result, 0)
        self.assertEqual((base / "stdout").read_text(), "256\n")

    async def test_a_niceness_lowers_the_translators_priority(self) -> None:
        # Warm-ups run so: a client's compile is not slowed by them.
        self.assertNotIn("/usr/bin/nice", launcher(TranslatorLimits()))
        run, base = self.run_shell("cut -d' ' -f19 /proc/self/stat",
                                   TranslatorLimits(niceness=10))
        self.assertEqual(await run.result, 0)
        self.assertEqual(int((base / "stdout").read_text()), min(19, os.nice(0) + 10))

    async def test_no_limits_means_no_prlimit(self) -> None:
        self.assertNotIn("/usr/bin/prlimit", launcher(TranslatorLimits(address_space=None)))
        run, base = self.run_shell("ulimit -t; ulimit -v")
        self.assertEqual(await run.result, 0)
        self.assertEqual((base / "stdout").read_text(), f"unlimited\n{4 << 20}\n",
                         "only the default address space limit")

    async def test_own_session_and_group(self) -> None:
        run, base = self.run_shell("ps -o pid=,pgid=,sid= -p $$")
        self.assertEqual(await run.result, 0)
        pid, pgid, sid = (base / "stdout").read_text().split()
        self.assertEqual(pid, str(run.pid))
        self.assertEqual((pgid, sid), (pid, pid), "leader of its own session and group")

    def test_translator_ends_when_the_server_is_killed(self) -> None:
        """SIGKILL of the server (no chance to clean up) still ends stap."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        server = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from twisted.internet import reactor
from stapsrv.compile.translator import start_translator
base = Path({str(base)!r})
def go():
    run = start_translator(reactor, ["/bin/sh", "-c", "echo $$ > pid; exec sleep 300"],
                           {{"PATH": "/usr/bin:/bin"}}, base, base / "out", base / "err")
reactor.callWhenRunning(go)
reactor.run()
"""])
        self.addCleanup(server.kill)
        pid_file = base / "pid"
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.02)
        translator = int(pid_file.read_text())
        server.kill()
        server.wait()
        for _ in range(100):
            try:
                state = Path(f"/proc/{translator}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break
            time.sleep(0.02)
        else:
            os.kill(translator, signal.SIGKILL)
            self.fail("the translator outlived the killed server")

    async def test_file_size_limit_stops_a_big_write(self) -> None:
        run, base = self.run_shell(
            "head -c 3000000 /dev/zero > big; echo $?", TranslatorLimits(file_size=1 << 20))
        await run.result
        self.assertNotEqual((base / "stdout").read_text().strip(), "0")
        self.assertEqual((base / "big").stat().st_size, 1 << 20)
        self.assertEqual(os.listdir(base).count("big"), 1)


class GroupMembersTests(TestCase):
    """What the launcher waits for after the translator exits: live
    processes of its group, never zombies."""

    def test_a_running_member_is_live(self) -> None:
        sleeper = subprocess.Popen(["/usr/bin/setsid", "/bin/sleep", "60"])
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        for _ in range(500):  # setsid execs sleep in the same process
            if os.getpgid(sleeper.pid) == sleeper.pid:
                break
            time.sleep(0.01)
        self.assertEqual(live_group_members(sleeper.pid), [sleeper.pid])

    def test_a_zombie_is_not(self) -> None:
        child = subprocess.Popen(["/usr/bin/setsid", "/bin/true"])
        self.addCleanup(child.wait)
        # Not reaped: the group exists, its only member a zombie.
        for _ in range(500):
            state = Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state == "Z":
                break
            time.sleep(0.01)
        os.killpg(child.pid, 0)
        self.assertEqual(live_group_members(child.pid), [])

    def test_odd_command_names_are_read(self) -> None:
        proc = Path(self.mktemp())
        (proc / "41").mkdir(parents=True)
        (proc / "42").mkdir()
        (proc / "self").mkdir()
        (proc / "41" / "stat").write_text("41 (a) b (c) S 1 77 77 0 -1\n")
        (proc / "42" / "stat").write_text("42 (x) Z 1 77 77 0 -1\n")
        self.assertEqual(live_group_members(77, proc), [41])
        self.assertEqual(live_group_members(78, proc), [])

    async def test_output_held_open_outside_the_group_does_not_hold_the_answer(self) -> None:
        """Without the sandbox a process can leave the group (setsid) with
        the output pipe: the run still ends, a few seconds on."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        run = start_translator(
            reactor, ["/bin/sh", "-c", "echo before; exec python3 -c \"import os, sys, time\n"
                      "if os.fork(): sys.exit(0)\n"
                      "os.setsid(); open('escaped', 'w').write(str(os.getpid())); "
                      "time.sleep(60)\""],
            {"PATH": "/usr/bin:/bin"}, base, base / "stdout", base / "stderr")

        def end_the_sleeper() -> None:
            try:
                os.kill(int((base / "escaped").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.addCleanup(end_the_sleeper)
        self.assertEqual(await run.result, 0)
        self.assertEqual((base / "stdout").read_text(), "before\n")
    test_output_held_open_outside_the_group_does_not_hold_the_answer.timeout = 30  # type: ignore[attr-defined]

    async def test_sandboxed_leftovers_do_not_outlive_the_run(self) -> None:
        require_program("bwrap")
        base = Path(self.mktemp()).absolute()
        (base / "request").mkdir(parents=True)
        sandbox = Sandbox(home=base / "home", systemtap_dir=base / "home" / ".systemtap")
        sandbox.prepare(base, None, StapconfStore(base / "stapconf"))
        run = start_translator(
            reactor, ["/bin/sh", "-c", "sleep 60 & echo $! > left"], {"PATH": "/usr/bin:/bin"},
            base / "request", base / "stdout", base / "stderr", sandbox=sandbox.words(base))
        self.assertEqual(await run.result, 0, (base / "stderr").read_text())
        self.assertTrue((base / "request" / "left").read_text().strip())
        self.assertEqual(live_group_members(run.pid), [])


class ExecSizeTests(TestCase):
    def test_too_long_a_command_is_refused_before_forking(self) -> None:
        import errno

        base = Path(self.mktemp()).absolute()
        base.mkdir()
        for argv in (["/bin/true", "x" * (200 * 1024)], ["/bin/true"] + ["y" * 100_000] * 40):
            with self.assertRaises(OSError) as caught:
                start_translator(reactor, argv, {}, base, base / "out", base / "err")
            self.assertEqual(caught.exception.errno, errno.E2BIG)
        self.assertEqual(sorted(os.listdir(base)), [], "nothing opened or written")
