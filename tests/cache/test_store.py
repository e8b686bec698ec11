"""The response cache (stapsrv.cache.store): self-checking entries, the disk
cache's size cap, the tiered cache, and the handler's use of them (hits,
damaged entries, single flight, failures, counters) with a counting fake
translator."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from stapsrv.cache.store import (
    MAGIC,
    CorruptEntry,
    DiskCache,
    TieredCache,
    find_answer,
    decode_entry,
    encode_entry,
)
from stapsrv.compile.context import RequestContext
from tests.helpers.archives import RELEASE, make_zip, request
from tests.helpers.handlers import KEY_A, KEY_B, CachedHandlerCase, Events, HandlerCase
from tests.helpers.waiting import NET, poll
from tests.helpers.vectors import members


def hex_key(number: int) -> str:
    """A distinct 64-hex-digit key per number, spread over the buckets."""
    return f"{number * 2654435761 % (1 << 32):08x}" + f"{number:056x}"


class EntryTests(TestCase):
    """The stored format: what is read back is exactly what was stored."""

    def test_round_trip(self) -> None:
        entry = encode_entry(KEY_A, b"PK answer")
        self.assertTrue(entry.startswith(MAGIC))
        self.assertEqual(decode_entry(KEY_A, entry), b"PK answer")

    def test_empty_answer_round_trips(self) -> None:
        self.assertEqual(decode_entry(KEY_A, encode_entry(KEY_A, b"")), b"")

    def test_any_flipped_byte_is_detected(self) -> None:
        entry = encode_entry(KEY_A, b"PK some answer bytes")
        for index in range(len(entry)):
            damaged = bytearray(entry)
            damaged[index] ^= 0x01
            with self.assertRaises(CorruptEntry, msg=f"byte {index}"):
                decode_entry(KEY_A, bytes(damaged))

    def test_truncated_or_extended_entry_is_detected(self) -> None:
        entry = encode_entry(KEY_A, b"PK answer")
        for damaged in (entry[:-1], entry + b"x", entry[:10], b""):
            with self.assertRaises(CorruptEntry):
                decode_entry(KEY_A, damaged)

    def test_entry_of_another_key_is_refused(self) -> None:
        with self.assertRaisesRegex(CorruptEntry, "another key"):
            decode_entry(KEY_B, encode_entry(KEY_A, b"PK answer"))


class DiskCacheCase(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.log = Events()

    def cache(self, max_bytes: int = 1 << 20) -> DiskCache:
        # The blocking halves need no pool; the async ones get the reactor's.
        return DiskCache(self.directory, max_bytes, reactor, reactor.getThreadPool(),
                         Logger(observer=self.log))

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())


class DiskCacheTests(DiskCacheCase):
    """One file per answer, checked on every read."""

    async def test_put_then_get(self) -> None:
        cache = self.cache()
        self.assertIsNone(await cache.get(KEY_A))
        await cache.put(KEY_A, b"PK answer")
        self.assertEqual(await cache.get(KEY_A), b"PK answer")
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(self.files(), [self.directory / "aa" / KEY_A])

    def test_a_new_cache_on_the_same_directory_finds_the_entries(self) -> None:
        self.cache().store(KEY_A, b"PK answer")
        self.assertEqual(self.cache().lookup(KEY_A), b"PK answer")

    def test_flipped_byte_on_disk_is_removed(self) -> None:
        cache = self.cache()
        cache.store(KEY_A, b"PK answer")
        [path] = self.files()
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
        self.assertIsNone(cache.lookup(KEY_A))
        self.assertFalse(path.exists(), "the damaged entry is gone")
        self.assertEqual(len(self.log.matching("Damaged cache entry")), 1)
        self.assertIn("checksum mismatch", self.log.matching("Damaged cache entry")[0])

    def test_entry_copied_to_another_keys_path_is_refused(self) -> None:
        cache = self.cache()
        cache.store(KEY_A, b"PK answer A")
        target = self.directory / KEY_B[:2] / KEY_B
        target.parent.mkdir()
        shutil.copyfile(self.directory / KEY_A[:2] / KEY_A, target)
        self.assertIsNone(cache.lookup(KEY_B))
        self.assertFalse(target.exists())
        self.assertEqual(cache.lookup(KEY_A), b"PK answer A", "the original is untouched")
        self.assertIn("stored under another key", self.log.matching("Damaged")[0])

    def test_empty_file_is_a_miss(self) -> None:
        cache = self.cache()
        path = self.directory / KEY_A[:2] / KEY_A
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        self.assertIsNone(cache.lookup(KEY_A))
        self.assertFalse(path.exists())

    def test_store_replaces_and_leaves_no_temporary_files(self) -> None:
        cache = self.cache()
        cache.store(KEY_A, b"PK one")
        cache.store(KEY_A, b"PK two")
        self.assertEqual(cache.lookup(KEY_A), b"PK two")
        self.assertEqual([p.name for p in self.files()], [KEY_A])

    def test_unwritable_directory_is_a_warning_not_an_error(self) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.directory.write_text("a file where the directory should be")
        cache = self.cache()
        cache.store(KEY_A, b"PK answer")
        self.assertIsNone(cache.lookup(KEY_A))
        self.assertEqual(len(self.log.matching("Cannot store cache entry")), 1)


class SizeCapTests(DiskCacheCase):
    """``--cache-size``: the least recently used answers go first."""

    ANSWER = b"PK" + b"x" * 998

    def entry_size(self) -> int:
        return len(encode_entry(KEY_A, self.ANSWER))

    @staticmethod
    def tick() -> None:
        # File times move in clock ticks (a few ms): keep uses apart.
        time.sleep(0.012)

    def test_total_stays_under_the_cap_and_newest_survive(self) -> None:
        cap = 5 * self.entry_size() + self.entry_size() // 2
        cache = self.cache(cap)
        for number in range(40):
            cache.store(hex_key(number), self.ANSWER)
            self.assertLessEqual(cache.size(), cap, f"after store {number}")
            self.tick()
        survivors = [n for n in range(40) if cache.lookup(hex_key(n)) is not None]
        self.assertEqual(survivors, [35, 36, 37, 38, 39])
        self.assertLessEqual(sum(p.stat().st_size for p in self.files()), cap)

    def test_a_hit_keeps_an_entry(self) -> None:
        cap = 3 * self.entry_size()
        cache = self.cache(cap)
        for number in range(3):
            cache.store(hex_key(number), self.ANSWER)
            self.tick()
        self.assertEqual(cache.lookup(hex_key(0)), self.ANSWER)  # now the most recent
        self.tick()
        cache.store(hex_key(3), self.ANSWER)
        self.tick()
        cache.store(hex_key(4), self.ANSWER)
        found = {n for n in range(5) if cache.lookup(hex_key(n)) is not None}
        self.assertEqual(found, {0, 3, 4})

    def test_answer_larger_than_the_cap_is_not_stored(self) -> None:
        cache = self.cache(self.entry_size() - 1)
        cache.store(KEY_A, self.ANSWER)
        self.assertEqual(self.files(), [])
        self.assertIsNone(cache.lookup(KEY_A))

    def test_servers_sharing_the_directory_keep_the_cap_together(self) -> None:
        """Several servers of one user (one twistd process, or the manager's
        servers) share the default $SYSTEMTAP_DIR/stapsrv-cache; the cap is
        on the directory, so together they stay under it too."""
        cap = 5 * self.entry_size()
        servers = [self.cache(cap), self.cache(cap)]
        for number in range(20):
            servers[number % 2].store(hex_key(number), self.ANSWER)
            self.tick()
            self.assertLessEqual(DiskCache(self.directory, cap, None, None).size(), cap,
                                 f"after store {number}")

    def test_restart_with_a_smaller_cap_trims_the_directory(self) -> None:
        big = self.cache(100 * self.entry_size())
        for number in range(10):
            big.store(hex_key(number), self.ANSWER)
            self.tick()
        small = self.cache(4 * self.entry_size())
        small.store(hex_key(10), self.ANSWER)
        self.assertLessEqual(small.size(), 4 * self.entry_size())
        found = {n for n in range(11) if small.lookup(hex_key(n)) is not None}
        self.assertEqual(found, {7, 8, 9, 10})


class MemoryCache:
    """A ResponseCache in a dict, counting calls."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.gets = 0
        self.puts = 0

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.entries.get(key)

    async def put(self, key: str, response: bytes) -> None:
        self.puts += 1
        self.entries[key] = response


class TieredCacheTests(TestCase):
    """The local cache in front of the fleet cache."""

    async def test_local_hit_does_not_ask_the_fleet(self) -> None:
        local, shared = MemoryCache(), MemoryCache()
        local.entries[KEY_A] = b"local"
        self.assertEqual(await TieredCache(local, shared).get(KEY_A), b"local")
        self.assertEqual(shared.gets, 0)

    async def test_fleet_hit_is_kept_locally(self) -> None:
        local, shared = MemoryCache(), MemoryCache()
        shared.entries[KEY_A] = b"shared"
        tiered = TieredCache(local, shared)
        self.assertEqual(await tiered.get(KEY_A), b"shared")
        self.assertEqual(local.entries, {KEY_A: b"shared"})
        self.assertEqual(await tiered.get(KEY_A), b"shared")
        self.assertEqual(shared.gets, 1)

    async def test_find_says_which_tier_answered(self) -> None:
        local, shared = MemoryCache(), MemoryCache()
        shared.entries[KEY_A] = b"shared"
        tiered = TieredCache(local, shared)
        self.assertEqual(await find_answer(tiered, KEY_A), (b"shared", "fleet"))
        self.assertEqual(await find_answer(tiered, KEY_A), (b"shared", "disk"))
        self.assertIsNone(await find_answer(tiered, KEY_B))

    async def test_miss_everywhere(self) -> None:
        local, shared = MemoryCache(), MemoryCache()
        self.assertIsNone(await TieredCache(local, shared).get(KEY_A))
        self.assertEqual((local.gets, shared.gets, local.puts), (1, 1, 0))

    async def test_put_goes_to_both(self) -> None:
        local, shared = MemoryCache(), MemoryCache()
        await TieredCache(local, shared).put(KEY_A, b"new")
        self.assertEqual(local.entries, {KEY_A: b"new"})
        self.assertEqual(shared.entries, {KEY_A: b"new"})


class HandlerCacheTests(CachedHandlerCase):
    """What a client sees when the server answers from its cache."""

    async def test_same_request_twice_is_one_compile(self) -> None:
        handler = self.cached_handler()
        first = await self.raw(handler, request("-p4", "-eprobe begin {}"))
        second = await self.raw(handler, request("-p4", "-eprobe begin {}"))
        self.assertEqual(self.runs(), 1)
        self.assertEqual(second, first, "the cached answer is byte-identical")
        self.assertGoodModule(second)
        self.assertEqual(len(self.entries()), 1)
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (2, 0, 1))

    async def test_observer_hears_outcomes_tiers_and_translator_runs(self) -> None:
        handler = self.cached_handler()
        heard: list[tuple[str, object]] = []

        class Recorder:
            def request_done(self, outcome: str, seconds: float) -> None:
                heard.append(("request", outcome))

            def cache_hit(self, tier: str) -> None:
                heard.append(("hit", tier))

            def translator_done(self, seconds: float, exit_status: int | None) -> None:
                heard.append(("translator", exit_status))

        handler.observer = Recorder()
        await self.raw(handler, request("-p4", "-eprobe begin {}"))
        await self.raw(handler, request("-p4", "-eprobe begin {}"))
        self.assertEqual([event for event in heard if event[0] != "translator"],
                         [("request", "compiled"), ("hit", "disk"), ("request", "cached")])
        self.assertIn(("translator", 0), heard)

    async def test_repeated_answer_leaves_out_kbuild_leftovers(self) -> None:
        """A cold build's answer carries kbuild's files (as 4.8's does); the
        answer to the same request again is the one a warm translator gives."""
        handler = self.cached_handler()
        first = members(await self.raw(handler, request("-p4", "-ecold")))
        second = members(await self.raw(handler, request("-p4", "-ecold")))
        self.assertEqual(self.runs(), 1)
        self.assertIn("stap000000/.stap_fake_1.o.cmd", first)
        self.assertIn("stap000000/Module.symvers", first)
        self.assertEqual(sorted(second), ["rc", "stap000000/", "stap000000/stap_fake_1.ko",
                                          "stap000000/stap_fake_1_src.c", "stderr", "stdout",
                                          "version"])
        for name in second:
            self.assertEqual(second[name], first[name], name)

    async def test_symbols_still_being_made_never_hold_a_repeated_request(self) -> None:
        handler = self.cached_handler()
        first = await self.raw(handler, request("-p4", "-eprobe begin {}"))
        making: Deferred[None] = Deferred()  # symbols of the release, never done here
        handler.releases._debug_work[RELEASE] = making
        handler.releases.symbol_wait = 3600.0
        answered = Deferred.fromCoroutine(self.raw(handler, request("-p4", "-eprobe begin {}")))
        self.assertTrue(await poll(lambda: answered.called, NET), "the cache hit waited")
        self.assertEqual(await answered, first)
        self.assertEqual((self.runs(), handler.counters.cache_hits), (1, 1))
        self.assertFalse(making.called)

    async def test_cache_survives_a_restart(self) -> None:
        first = await self.raw(self.cached_handler(), request("-p4"))
        second = await self.raw(self.cached_handler(), request("-p4"))
        self.assertEqual(self.runs(), 1)
        self.assertEqual(second, first)

    async def test_no_cache_compiles_every_time(self) -> None:
        handler = HandlerCase.handler(self)
        handler.environ = dict(handler.environ, FAKESTAP_COUNT=str(self.count_file))
        await self.raw(handler, request("-p4"))
        await self.raw(handler, request("-p4"))
        self.assertEqual(self.runs(), 2)
        self.assertEqual(handler.counters.cache_hits, 0)

    async def test_flipped_byte_on_disk_is_recompiled(self) -> None:
        handler = self.cached_handler()
        body = request("-p4", "-eprobe begin {}")
        first = await self.raw(handler, body)
        [path] = self.entries()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        second = await self.raw(handler, body)
        self.assertEqual(self.runs(), 2, "the damaged entry was not used")
        self.assertGoodModule(second)
        self.assertNotEqual(second, first, "a new compile (the fake module is random)")
        self.assertEqual(len(self.cache_log.matching("Damaged cache entry")), 1)
        [path] = self.entries()
        third = await self.raw(handler, body)
        self.assertEqual(self.runs(), 2, "the new answer was stored intact")
        self.assertEqual(third, second)
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (3, 0, 1))

    async def test_damaged_header_is_recompiled(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        await self.raw(handler, body)
        [path] = self.entries()
        data = bytearray(path.read_bytes())
        data[0] ^= 0x01
        path.write_bytes(bytes(data))
        self.assertGoodModule(await self.raw(handler, body))
        self.assertEqual(self.runs(), 2)

    async def test_entry_of_another_request_is_refused(self) -> None:
        handler = self.cached_handler()
        body_a = request("-p4", "-eprobe begin { a }")
        body_b = request("-p4", "-eprobe begin { b }")
        answer_a = await self.raw(handler, body_a)
        [path_a] = self.entries()
        answer_b = await self.raw(handler, body_b)
        [path_b] = [p for p in self.entries() if p != path_a]
        shutil.copyfile(path_a, path_b)
        again_b = await self.raw(handler, body_b)
        self.assertEqual(self.runs(), 3, "b compiled again instead of taking a's answer")
        self.assertNotEqual(again_b, answer_a)
        self.assertNotEqual(again_b, answer_b)
        self.assertGoodModule(again_b)
        self.assertEqual(len(self.cache_log.matching("stored under another key")), 1)
        self.assertEqual(await self.raw(handler, body_a), answer_a, "a's own entry still good")
        self.assertEqual(self.runs(), 3)

    async def test_failed_request_is_not_cached(self) -> None:
        handler = self.cached_handler()
        first = members(await self.raw(handler, request("-p4", "-efail")))
        second = members(await self.raw(handler, request("-p4", "-efail")))
        self.assertEqual(first["rc"], b"1")
        self.assertEqual(second["rc"], b"1")
        self.assertEqual(self.runs(), 2)
        self.assertEqual(self.entries(), [])
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (2, 2, 0))

    async def test_killed_translator_is_not_cached(self) -> None:
        handler = self.cached_handler()
        await self.raw(handler, request("-p4", "-esignal"))
        await self.raw(handler, request("-p4", "-esignal"))
        self.assertEqual(self.runs(), 2)
        self.assertEqual(self.entries(), [])

    async def test_refusals_are_not_cached(self) -> None:
        handler = self.cached_handler()
        for _ in range(2):
            found = members(await self.raw(handler, request("-p4", release="5.0.0-other")))
            self.assertEqual(found["rc"], b"1")
        self.assertIsNone(await handler.handle(b"PK\x03\x04garbage", RequestContext("peer")))
        self.assertEqual(self.runs(), 0)
        self.assertEqual(self.entries(), [])
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (3, 3, 0))

    async def test_two_identical_requests_at_once_compile_once(self) -> None:
        self.sleep = 1.0
        handler = self.cached_handler()
        body = request("-p4", "-eprobe begin { together }")
        answers = await gatherResults([
            Deferred.fromCoroutine(self.raw(handler, body)),
            Deferred.fromCoroutine(self.raw(handler, body))])
        self.assertEqual(self.runs(), 1, "the second waited for the first compile")
        self.assertEqual(answers[0], answers[1])
        self.assertGoodModule(answers[0])
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (2, 0, 1))
        self.assertEqual(len(self.entries()), 1)

    async def test_waiters_of_a_failed_compile_compile_themselves(self) -> None:
        self.sleep = 0.5
        handler = self.cached_handler()
        body = request("-p4", "-efail")
        answers = await gatherResults([
            Deferred.fromCoroutine(self.raw(handler, body)),
            Deferred.fromCoroutine(self.raw(handler, body))])
        self.assertEqual([members(a)["rc"] for a in answers], [b"1", b"1"])
        self.assertEqual(self.runs(), 2)
        self.assertEqual(self.entries(), [])
        self.assertEqual((handler.counters.requests, handler.counters.failures,
                          handler.counters.cache_hits), (2, 2, 0))

    async def test_counters_after_a_mix(self) -> None:
        handler = self.cached_handler()
        await self.raw(handler, request("-p4", "-eone"))      # compile
        await self.raw(handler, request("-p4", "-eone"))      # hit
        await self.raw(handler, request("-p4", "-efail"))     # failure
        await self.raw(handler, request("-p4", "-etwo"))      # compile
        await self.raw(handler, request("-p4", "-eone"))      # hit
        await self.raw(handler, request("-p4", "-efail"))     # failure again
        await self.raw(handler, request("-p4", "-etwo"))      # hit
        counters = handler.counters
        self.assertEqual((counters.requests, counters.failures, counters.cache_hits,
                          counters.compiling), (7, 2, 3, 0))
        self.assertEqual(self.runs(), 4)

    async def test_small_cap_in_the_handler(self) -> None:
        handler = self.cached_handler()
        first = await self.raw(handler, request("-p4", "-e0"))
        entry = self.entries()[0].stat().st_size
        handler = self.cached_handler(max_bytes=int(entry * 2.5))
        for number in range(1, 6):
            await self.raw(handler, request("-p4", f"-e{number}"))
            time.sleep(0.012)
        self.assertLessEqual(sum(p.stat().st_size for p in self.entries()), int(entry * 2.5))
        self.assertEqual(len(self.entries()), 2)
        runs = self.runs()
        await self.raw(handler, request("-p4", "-e5"))
        self.assertEqual(self.runs(), runs, "the newest is still there")
        self.assertNotEqual(await self.raw(handler, request("-p4", "-e0")), first)
        self.assertEqual(self.runs(), runs + 1, "the oldest is gone")

    async def test_request_with_tapset_directory_is_cached(self) -> None:
        handler = self.cached_handler()
        body = make_zip([
            ("argv1", b"-I", 0o100644), ("argv2", b"tapset/t", 0o100644),
            ("argv3", b"-p4", 0o100644),
            ("sysinfo", f"sysinfo: {RELEASE} x86_64".encode(), 0o100644),
            ("locale", b"LANG=C.UTF-8\n", 0o100644), ("version", b"4.8", 0o100644),
            ("tapset/", b"", 0o40755), ("tapset/t/", b"", 0o40755),
            ("tapset/t/my.stp", b"function f() { }\n", 0o100644)])
        first = await self.raw(handler, body)
        self.assertEqual(await self.raw(handler, body), first)
        self.assertEqual(self.runs(), 1)
