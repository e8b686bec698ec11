from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from stapsrv.compile.context import RequestContext
from stapsrv.compile.handler import Outcome, RequestHandler
from stapsrv.compile.job import Job
from stapsrv.config.values import TranslatorLimits
from stapsrv.core.cmdline import ServerOption
from tests.helpers import signature_hash, test_identity
from tests.helpers.archives import RELEASE, make_zip, request
from tests.helpers.handlers import CachedHandlerCase, HandlerCase, alive
from tests.helpers.waiting import NET, poll
from tests.helpers.vectors import captured_requests


class HandlerTests(HandlerCase):
    async def test_module_returned(self) -> None:
        found = await self.answer(request("-p4", "-eok"))
        self.assertEqual(found["version"], b"4.8")
        self.assertEqual(found["rc"], b"0")
        self.assertTrue(found["stap000000/stap_fake_1.ko"].startswith(b"\x7fELF"))
        self.assertNotIn("stap000000/stap_fake_1.ko.sgn", found)
        self.assertEqual(found["stdout"], b"<server>/.systemtap/cache/fa/stap_fake_1.ko\n")
        self.assertEqual(os.listdir(self.tmpdir), [], "scratch directory removed")

    async def test_translator_command_line_and_environment(self) -> None:
        self.options = (ServerOption("-D", "A=1"),)
        await self.answer(request("-p4", "-eok", locale=b"LANG=C\nLC_ALL=fr_FR.UTF-8\n"))
        record = self.recorded()
        argv = record["argv"]
        self.assertEqual(argv[0], f"-r{RELEASE}")
        self.assertEqual(argv[1:3], ["-DA=1", "-R/fixed/runtime"])
        self.assertTrue(argv[3].startswith("--tmpdir=" + str(self.tmpdir / "stap-server.")))
        self.assertTrue(argv[3].endswith("/response/stap000000"))
        self.assertEqual(argv[4:], ["--client-options", "-p4", "-eok"])
        self.assertTrue(record["cwd"].endswith("/request"))
        self.assertEqual(record["env"]["LANG"], "C")
        self.assertEqual(record["env"]["LC_ALL"], "fr_FR.UTF-8")
        self.assertTrue(record["env"]["TMPDIR"].startswith(str(self.tmpdir)))
        self.assertEqual(record["pgid"], record["pid"], "stap leads its own process group")

    async def test_explicit_runtime_replaces_the_fixed_one(self) -> None:
        await self.answer(request("-p4"), self.handler(runtime="/mine",
                          server_options=(ServerOption("-R", "/mine"),)))
        argv = self.recorded()["argv"]
        self.assertIn("-R/mine", argv)
        self.assertNotIn("-R/fixed/runtime", argv)

    async def test_old_client_gets_no_locale(self) -> None:
        await self.answer(request("-p4", locale=b"LANG=fr_FR\n", version=b"1.5"))
        self.assertNotEqual(self.recorded()["env"]["LANG"], "fr_FR")

    async def test_failure_passes_rc_and_stderr(self) -> None:
        found = await self.answer(request("-p4", "-efail"))
        self.assertEqual(found["rc"], b"1")
        self.assertEqual(found["stderr"], b"semantic error: fake failure\n")
        self.assertNotIn("stap000000/stap_fake_1.ko", found)

    async def test_killed_translator_reports_128_plus_signal(self) -> None:
        found = await self.answer(request("-p4", "-esignal"))
        self.assertEqual(found["rc"], b"137")
        self.assertTrue(found["stderr"].endswith(
            b"Server: The translator was ended by SIGKILL.\n"), found["stderr"])
        found = await self.answer(request("-p4", "-esignal"), self.handler(
            limits=TranslatorLimits(cpu_seconds=60)))
        self.assertIn(b"It may have gone past its CPU time limit (--cpu-limit).",
                      found["stderr"])

    async def test_unprivileged_module_is_signed(self) -> None:
        for privilege in ("--privilege=stapusr", "--privilege=stapsys", "--unprivileged"):
            found = await self.answer(request(privilege, "-p4"))
            module = found["stap000000/stap_fake_1.ko"]
            signature = found["stap000000/stap_fake_1.ko.sgn"]
            test_identity().certificate.public_key().verify(signature, module, PKCS1v15(), SHA256())

    async def test_signature_digest_follows_the_client_version(self) -> None:
        public_key = test_identity().key.public_key()
        for version, digest in ((b"4.7", "sha1"), (b"4.8", "sha256"), (b"5.5", "sha256")):
            found = await self.answer(request("--privilege=stapusr", "-p4", version=version))
            self.assertEqual(signature_hash(public_key, found["stap000000/stap_fake_1.ko.sgn"],
                                            found["stap000000/stap_fake_1.ko"]), digest, version)

    async def test_stapdev_module_is_not_signed(self) -> None:
        found = await self.answer(request("--privilege=stapdev", "-p4"))
        self.assertNotIn("stap000000/stap_fake_1.ko.sgn", found)

    async def test_failed_unprivileged_request_is_not_signed(self) -> None:
        found = await self.answer(request("--privilege=stapusr", "-efail"))
        self.assertNotIn("stap000000/stap_fake_1.ko.sgn", found)

    async def test_unsupported_release(self) -> None:
        found = await self.answer(request("-p4", release="5.0.0-other"))
        self.assertEqual(found["rc"], b"1")
        self.assertIn(b"'5.0.0-other'", found["stderr"])
        self.assertIn(RELEASE.encode(), found["stderr"])
        self.assertFalse(self.record.exists(), "the translator never ran")

    async def test_missing_sysinfo(self) -> None:
        body = make_zip([("argv1", b"-p4", 0o100644), ("version", b"4.8", 0o100644)])
        found = await self.answer(body)
        self.assertEqual(found["rc"], b"1")
        self.assertIn(b"sysinfo", found["stderr"])

    async def test_locale_complaints_precede_translator_output(self) -> None:
        found = await self.answer(request("-efail", locale=b"LANG=en_US;.utf8\n"))
        self.assertEqual(found["stderr"], (
            b"Server: Localization value 'en_US;.utf8' contains illegal characters\n"
            b"semantic error: fake failure\n"))

    async def test_paths_are_rewritten(self) -> None:
        found = await self.answer(request("-ehome"))
        self.assertIn(b"home is <server>/x and tmp is <server>/stap000000/y", found["stderr"])

    async def test_oversize_archive_is_explained(self) -> None:
        body = request("-p4", "-e" + "x" * 100)
        found = await self.answer(body, self.handler(max_request_size=100))
        self.assertEqual(found["rc"], b"1")
        self.assertRegex(found["stderr"].decode(),
                         r"^Server: The request is \d+ bytes uncompressed; this server "
                         r"accepts 1 to 100 bytes \(its --max-request-size\).\n$")
        self.assertFalse(self.record.exists())
        self.assertEqual(os.listdir(self.tmpdir), [])

    async def test_corrupt_archive_gets_no_answer(self) -> None:
        response = await self.handler().handle(b"PK\x03\x04garbage", RequestContext("peer"))
        self.assertIsNone(response)
        self.assertEqual(os.listdir(self.tmpdir), [])

    async def test_keep_temporary(self) -> None:
        self.keep = True
        await self.answer(request("-p4"))
        self.assertIn("-k", self.recorded()["argv"][:4])
        [kept] = os.listdir(self.tmpdir)
        self.assertTrue((self.tmpdir / kept / "request.zip").is_file())
        self.assertTrue((self.tmpdir / kept / "response" / "rc").is_file())

    async def test_captured_request_runs(self) -> None:
        found = await self.answer(captured_requests()["04-scriptfile-tapsetdir-args"])
        self.assertEqual(found["rc"], b"0")
        record = self.recorded()
        self.assertEqual(record["argv"][-8:], [
            "script/home/user/cli3/hello.stp", "-I", "tapset/home/user/cli3/tapsets",
            f"-r{RELEASE}", "-p4", "--", "str arg", "42"])
        self.assertEqual(record["exists"], {"script/home/user/cli3/hello.stp": True,
                                            "tapset/home/user/cli3/tapsets": True})

    async def test_abandoned_request_kills_the_process_group(self) -> None:
        context = RequestContext("peer")
        work = Deferred.fromCoroutine(self.handler().handle(request("-esleep"), context))
        pids_file = Path(str(self.record) + ".pids")
        self.assertTrue(await poll(lambda: pids_file.exists() and pids_file.read_text(), NET),
                        "the fake translator started its child")
        pids = json.loads(pids_file.read_text())
        self.assertTrue(all(alive(pid) for pid in pids))
        context.abandon()
        self.assertIsNone(await work)
        self.assertTrue(await poll(lambda: not any(alive(pid) for pid in pids), NET),
                        "stap and its children are gone")
        self.assertEqual(os.listdir(self.tmpdir), [])


class RobustnessTests(HandlerCase):
    async def test_compile_timeout_stops_the_group_and_explains(self) -> None:
        # The fake translator sleeps for 300 s: only the timeout answers.
        handler = self.handler(compile_timeout=0.5)
        found = await self.answer(request("-esleep"), handler)
        self.assertEqual(found["rc"], b"1")
        self.assertIn(b"Server: The translator ran longer than the server's compile timeout "
                      b"(0.5 s) and was stopped.\n", found["stderr"])
        pids = json.loads(Path(str(self.record) + ".pids").read_text())
        self.assertTrue(await poll(lambda: not any(alive(pid) for pid in pids), NET),
                        "stap and its children are gone")
        self.assertEqual(os.listdir(self.tmpdir), [])
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.compiling), (1, 1, 0))

    async def test_full_disk_gets_a_clear_answer(self) -> None:
        import errno

        from stapsrv.compile import handler as handler_module

        def full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(handler_module, "_unpack", full)
        handler = self.handler()
        found = await self.answer(request("-p4"), handler)
        self.assertEqual(found["rc"], b"1")
        self.assertIn(b"Server: The server ran out of disk space", found["stderr"])
        self.assertEqual(os.listdir(self.tmpdir), [], "scratch directory removed")
        self.assertFalse(self.record.exists())
        self.assertEqual(handler.counters.failures, 1)


class FairSlotTests(HandlerCase):
    """Translator slots go to client addresses in turn."""

    async def test_one_clients_many_compiles_do_not_push_anothers_to_the_back(self) -> None:
        started: list[str] = []
        compiles: list[Deferred[None]] = []

        async def compile_(handler: RequestHandler, body: bytes, job: Job,
                           context: RequestContext) -> Outcome:
            started.append(context.peer)
            done: Deferred[None] = Deferred()
            compiles.append(done)
            await done
            return Outcome(b"answer", True)

        self.patch(RequestHandler, "_compile_in_scratch", compile_)
        handler = self.handler(max_threads=1)
        peers = [f"10.0.0.1:{port}" for port in range(1, 5)] + ["10.0.0.2:9"]
        answers = []
        for n, peer in enumerate(peers):
            answers.append(Deferred.fromCoroutine(handler.handle(
                request("-p4", f"-e{n}"), RequestContext(peer))))
            # Each in the queue before the next comes.
            self.assertTrue(await poll(lambda: len(started) + len(handler.gate.waiting) == n + 1,
                                       NET))
        self.assertEqual(started, peers[:1])
        while len(compiles) < len(peers):
            compiles[len(started) - 1].callback(None)
        compiles[-1].callback(None)
        # The second address's one request runs after the first address's
        # second (whose turn it was), not after its fifth.
        self.assertEqual(started, [peers[0], peers[1], peers[4], peers[2], peers[3]])
        for answer in answers:
            self.assertEqual(await answer, b"answer")
        self.assertEqual((handler.gate.tokens, len(handler.gate.waiting)), (1, 0))


class BudgetNoteTests(HandlerCase):
    """What the request's share of kernel store work kept from it reaches
    its client."""

    async def test_work_not_done_for_the_request_is_a_server_line_first(self) -> None:
        from stapsrv.compile.releases import ServedReleases

        async def over(releases: ServedReleases, release: str,
                       context: RequestContext | None = None) -> bool:
            assert context is not None
            context.notes.append("Server: Not starting the System.map (test).")
            return False

        self.patch(ServedReleases, "provide_debug_within", over)
        found = await self.answer(request("-p4", "-eok"))
        self.assertEqual(found["rc"], b"0")
        self.assertTrue(found["stderr"].startswith(
            b"Server: Not starting the System.map (test).\n"), found["stderr"])

    async def test_past_the_share_a_request_compiles_without_a_warm_up_and_is_told(
            self) -> None:
        from stapsrv.compile.sandbox import Sandbox
        from stapsrv.compile.warmup import WarmUp
        from stapsrv.core.budget import OverBudget

        async def over(warmup: WarmUp, release: str, guru: bool,
                       context: RequestContext | None = None,
                       toolchain: object = None) -> None:
            raise OverBudget("Server: Not starting the warm-up (test).")

        def no_bwrap(handler: RequestHandler, scratch: Path, release: str | None = None,
                     toolchain: object = None) -> tuple[str, ...]:
            return ()

        self.patch(WarmUp, "stapconf_ready", over)
        self.patch(RequestHandler, "sandbox_words", no_bwrap)
        handler = self.handler()
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.base / "stap")
        found = await self.answer(request("-p4", "-eok"), handler)
        self.assertEqual(found["rc"], b"0")
        # Before what its translator says.
        self.assertTrue(found["stderr"].startswith(
            b"Server: Not starting the warm-up (test). Compiling without it meanwhile.\n"
            b"Pass 4: "), found["stderr"])


class WarmUpHeaderTests(HandlerCase):
    """A request prepared before the warm-up it waits for is given the
    header that warm-up made (its translator would make it again)."""

    async def test_the_header_made_while_it_waited_is_in_its_systemtap_dir(self) -> None:
        from stapsrv.compile import handler as handler_module
        from stapsrv.compile.sandbox import Sandbox, StapconfStore
        from stapsrv.compile.warmup import WarmUp

        store = StapconfStore(self.base / "stapconf")
        made = store.directory / "ab" / "stapconf_abcd.h"

        async def warm_up(warmup: WarmUp, release: str, guru: bool,
                          context: RequestContext | None = None,
                          toolchain: object = None) -> None:
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text("#define STAPCONF_FAKE 1\n")

        def prepare(handler: RequestHandler, scratch: Path, release: str | None = None,
                    toolchain: object = None) -> tuple[str, ...]:
            assert handler.sandbox is not None
            handler.sandbox.prepare(scratch, None, store)
            return ()

        seen: list[list[str]] = []
        real_start = handler_module.start_translator

        def start(reactor: object, argv: list[str], env: dict[str, str], request_dir: Path,
                  *rest: object) -> object:
            # What the sandbox shows the translator as its SYSTEMTAP_DIR.
            cache = sandbox.private_dirs(request_dir.parent)[1] / "cache"
            seen.append(sorted(str(path.relative_to(cache)) for path in cache.rglob("*.h")))
            return real_start(reactor, argv, env, request_dir, *rest)  # type: ignore[arg-type]

        self.patch(WarmUp, "stapconf_ready", warm_up)
        self.patch(RequestHandler, "sandbox_words", prepare)
        self.patch(handler_module, "start_translator", start)
        handler = self.handler()
        handler.stapconf = store
        sandbox = Sandbox(home=self.home, systemtap_dir=self.base / "stap")
        handler.releases.sandbox = sandbox
        found = await self.answer(request("-p4", "-eok"), handler)
        self.assertEqual(found["rc"], b"0")
        self.assertEqual(seen, [["ab/stapconf_abcd.h"]])


class WarmUpAheadTests(HandlerCase):
    async def test_the_warm_up_starts_while_the_symbols_are_made(self) -> None:
        from stapsrv.compile.releases import ServedReleases
        from stapsrv.compile.sandbox import Sandbox
        from stapsrv.compile.warmup import WarmUp

        symbols: Deferred[None] = Deferred()
        warmed: list[tuple[str, bool]] = []

        async def slow_symbols(releases: ServedReleases, release: str,
                               context: RequestContext | None = None) -> bool:
            await symbols
            return True

        async def warm_up(warmup: WarmUp, release: str, guru: bool,
                          context: RequestContext | None = None,
                          toolchain: object = None) -> None:
            warmed.append((release, guru))

        def no_bwrap(handler: RequestHandler, scratch: Path, release: str | None = None,
                     toolchain: object = None) -> tuple[str, ...]:
            return ()

        self.patch(ServedReleases, "provide_debug_within", slow_symbols)
        self.patch(WarmUp, "stapconf_ready", warm_up)
        self.patch(RequestHandler, "sandbox_words", no_bwrap)
        handler = self.handler()
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.base / "stap")
        answer = Deferred.fromCoroutine(self.answer(request("-p4", "-g", "-eok"), handler))
        self.assertTrue(await poll(lambda: bool(warmed), NET), "warm-up started")
        self.assertEqual(warmed, [(RELEASE, True)])
        self.assertFalse(answer.called)
        symbols.callback(None)
        found = await answer
        self.assertEqual(found["rc"], b"0")
        # The request's own call found it (here: the fake records each call).
        self.assertEqual(warmed, [(RELEASE, True)] * 2)


class BudgetCacheTests(CachedHandlerCase):
    async def test_an_answer_carrying_a_note_is_not_kept(self) -> None:
        from stapsrv.compile.releases import ServedReleases

        async def over(releases: ServedReleases, release: str,
                       context: RequestContext | None = None) -> bool:
            assert context is not None
            context.notes.append("Server: Not starting the System.map (test).")
            return False

        handler = self.cached_handler()
        self.assertGoodModule(await self.raw(handler, request("-p4", "-eok")))
        self.assertGoodModule(await self.raw(handler, request("-p4", "-eok")))
        self.assertEqual(self.runs(), 1, "kept, then answered from the cache")
        self.patch(ServedReleases, "provide_debug_within", over)
        for _ in range(2):
            self.assertGoodModule(await self.raw(handler, request("-p4", "-etwo")))
        self.assertEqual(self.runs(), 3, "the note is for that request only")


class AppendTests(TestCase):
    """Server lines added to the translator's output."""

    def test_server_lines_start_on_a_line_of_their_own(self) -> None:
        from stapsrv.compile.handler import _append
        base = Path(self.mktemp())
        base.mkdir()
        cut = base / "cut"
        cut.write_bytes(b"binary \x00 garbage cut mid-li")
        _append(cut, ["Server: one", "Server: two"])
        self.assertEqual(cut.read_bytes(),
                         b"binary \x00 garbage cut mid-li\nServer: one\nServer: two\n")
        whole = base / "whole"
        whole.write_bytes(b"line\n")
        _append(whole, ["Server: x"])
        self.assertEqual(whole.read_bytes(), b"line\nServer: x\n")
        new = base / "new"
        _append(new, ["Server: é"])
        self.assertEqual(new.read_text(encoding="utf-8"), "Server: é\n")
