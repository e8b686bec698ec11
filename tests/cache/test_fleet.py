"""The fleet cache (stapsrv.cache.fleet) against a real redis-server on loopback:
round trips, damaged values, Redis going away and coming back, two
handlers sharing answers, and two real stapsrv servers with the real
client."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import redis
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from stapsrv.cache.fleet import PREFIX, RedisCache, display_url
from stapsrv.cache.store import DiskCache, TieredCache, encode_entry
from stapsrv.compile.handler import RequestHandler
from tests.helpers.archives import request
from tests.helpers.handlers import KEY_A, KEY_B, CachedHandlerCase, Events
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realredis import free_port, start_redis
from tests.helpers.realserver import Client, ServerProcess, remove_tree, scratch_directory

UNAVAILABLE = "unavailable"
AGAIN = "is answering again"


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class DisplayUrlTests(TestCase):
    """Passwords never reach the log."""

    def test_password_is_hidden(self) -> None:
        self.assertEqual(display_url("redis://:secret@cache.example:6379/0"),
                         "redis://:***@cache.example:6379/0")
        self.assertEqual(display_url("redis://user:secret@cache.example/2"),
                         "redis://user:***@cache.example/2")

    def test_plain_url_unchanged(self) -> None:
        self.assertEqual(display_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0")


class RedisCacheTests(TestCase):
    """RedisCache over a real redis-server."""

    def setUp(self) -> None:
        self.redis = start_redis(self, Path(self.mktemp()).absolute())
        self.log = Events()
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis.port)
        self.addCleanup(self.direct.close)

    def fleet(self, **options: float) -> RedisCache:
        cache = RedisCache(self.redis.url, reactor, log=Logger(observer=self.log), **options)
        self.addCleanup(cache.close)
        return cache

    async def test_put_then_get(self) -> None:
        cache = self.fleet()
        self.assertIsNone(await cache.get(KEY_A))
        await cache.put(KEY_A, b"PK answer")
        self.assertEqual(await cache.get(KEY_A), b"PK answer")
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(self.direct.get(PREFIX + KEY_A), encode_entry(KEY_A, b"PK answer"))

    async def test_another_server_sees_the_answer(self) -> None:
        await self.fleet().put(KEY_A, b"PK shared")
        self.assertEqual(await self.fleet().get(KEY_A), b"PK shared")

    async def test_entries_expire(self) -> None:
        await self.fleet(ttl=100).put(KEY_A, b"PK answer")
        self.assertTrue(0 < self.direct.ttl(PREFIX + KEY_A) <= 100)

    async def test_damaged_value_is_deleted(self) -> None:
        cache = self.fleet()
        entry = bytearray(encode_entry(KEY_A, b"PK answer"))
        entry[-1] ^= 0x01
        self.direct.set(PREFIX + KEY_A, bytes(entry))
        self.assertIsNone(await cache.get(KEY_A))
        self.assertEqual(self.direct.exists(PREFIX + KEY_A), 0, "deleted from Redis")
        [line] = self.log.matching("Damaged fleet cache entry")
        self.assertIn("checksum mismatch", line)

    async def test_value_of_another_key_is_refused(self) -> None:
        cache = self.fleet()
        self.direct.set(PREFIX + KEY_B, encode_entry(KEY_A, b"PK answer A"))
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(self.direct.exists(PREFIX + KEY_B), 0)
        self.assertIn("another key", self.log.matching("Damaged")[0])

    async def test_redis_down_then_back(self) -> None:
        cache = self.fleet(retry=0.5, timeout=1.0)
        await cache.put(KEY_A, b"PK before")
        self.assertEqual(await cache.get(KEY_A), b"PK before")

        self.redis.stop()
        started = time.monotonic()
        self.assertIsNone(await cache.get(KEY_A))
        self.assertIsNone(await cache.put(KEY_B, b"PK lost"))
        self.assertIsNone(await cache.get(KEY_B))
        self.assertFalse(cache.available, "calls are skipped for a while")
        self.assertLess(time.monotonic() - started, 1.5, "a miss, not a wait")
        await sleep(0.6)
        self.assertTrue(cache.available, "tried again after retry seconds")
        self.assertIsNone(await cache.get(KEY_A))  # fails again, quietly
        self.assertEqual(len(self.log.matching(UNAVAILABLE)), 1, self.log.lines())
        self.assertIn(self.redis.url, self.log.matching(UNAVAILABLE)[0])
        self.assertEqual(self.log.matching(AGAIN), [])

        self.redis.start()
        await sleep(0.6)
        await cache.put(KEY_A, b"PK after")
        self.assertEqual(await cache.get(KEY_A), b"PK after")
        self.assertEqual(len(self.log.matching(AGAIN)), 1, self.log.lines())
        self.assertEqual(len(self.log.matching(UNAVAILABLE)), 1)
        self.assertTrue(cache.available)

    async def test_down_again_warns_again(self) -> None:
        cache = self.fleet(retry=0.2)
        self.redis.stop()
        self.assertIsNone(await cache.get(KEY_A))
        self.redis.start()
        await sleep(0.3)
        await cache.put(KEY_A, b"PK")
        self.redis.stop()
        await cache.put(KEY_A, b"PK")
        self.assertEqual(len(self.log.matching(UNAVAILABLE)), 2, self.log.lines())
        self.assertEqual(len(self.log.matching(AGAIN)), 1)

    async def test_never_reachable(self) -> None:
        cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", reactor,
                           log=Logger(observer=self.log), retry=0.1)
        self.addCleanup(cache.close)
        for _ in range(3):
            self.assertIsNone(await cache.get(KEY_A))
            await cache.put(KEY_A, b"PK")
            await sleep(0.15)
        self.assertEqual(len(self.log.matching(UNAVAILABLE)), 1)


class FleetHandlerTests(CachedHandlerCase):
    """Two servers (handlers with their own disk caches) and one Redis."""

    def setUp(self) -> None:
        super().setUp()
        self.redis = start_redis(self, self.base / "redis")

    def server(self, name: str, retry: float = 5.0) -> tuple[RequestHandler, DiskCache, RedisCache]:
        local = DiskCache(self.base / f"cache-{name}", 1 << 24, reactor, self.pool,
                          Logger(observer=self.cache_log))
        fleet = RedisCache(self.redis.url, reactor, log=Logger(observer=self.cache_log),
                           retry=retry)
        self.addCleanup(fleet.close)
        handler = self.cached_handler(cache=TieredCache(local, fleet))
        return handler, local, fleet

    async def test_answer_compiled_on_one_server_is_a_hit_on_another(self) -> None:
        a, _, _ = self.server("a")
        b, local_b, _ = self.server("b")
        body = request("-p4", "-eprobe begin { fleet }")
        first = await self.raw(a, body)
        second = await self.raw(b, body)
        self.assertEqual(self.runs(), 1)
        self.assertEqual(second, first)
        self.assertEqual(b.counters.cache_hits, 1)
        self.assertEqual(len(local_b.entries()), 1, "b keeps the fleet's answer locally")
        self.redis.stop()
        self.assertEqual(await self.raw(b, body), first, "b answers from its own disk")
        self.assertEqual(self.runs(), 1)

    async def test_redis_down_requests_still_compile(self) -> None:
        a, _, _ = self.server("a")
        b, _, _ = self.server("b")
        self.redis.stop()
        body = request("-p4", "-eprobe begin { alone }")
        self.assertGoodModule(await self.raw(a, body))
        self.assertGoodModule(await self.raw(b, body))
        self.assertEqual(self.runs(), 2, "each compiled locally")
        self.assertEqual(len(self.cache_log.matching(UNAVAILABLE)), 2, "one warning each")
        self.assertEqual(b.counters.failures, 0)

    async def test_damaged_fleet_entry_is_recompiled(self) -> None:
        a, _, _ = self.server("a")
        b, _, _ = self.server("b")
        body = request("-p4", "-eprobe begin { damaged }")
        first = await self.raw(a, body)
        direct = redis.Redis(host="127.0.0.1", port=self.redis.port)
        self.addCleanup(direct.close)
        [name] = direct.keys(PREFIX + "*")
        entry = bytearray(direct.get(name))
        entry[len(entry) // 2] ^= 0x08
        direct.set(name, bytes(entry))
        second = await self.raw(b, body)
        self.assertEqual(self.runs(), 2)
        self.assertNotEqual(second, first)
        self.assertGoodModule(second)
        self.assertEqual(len(self.cache_log.matching("Damaged fleet cache entry")), 1)


class FleetServersTests(RealClientMixin, TestCase):
    """Two real stapsrv servers sharing a real Redis, and the real client."""

    timeout = 600

    def fleet_server(self, redis_url: str, name: str) -> ServerProcess:
        cache_dir = scratch_directory(f"fleet-{name}-")
        self.addCleanup(remove_tree, cache_dir)
        return self.own_server("--fleet-cache", redis_url, "--cache-dir", str(cache_dir))

    @staticmethod
    def running_lines(log: str, marker: str) -> list[str]:
        return [line for line in log.splitlines() if "Running [" in line and marker in line]

    async def compile(self, client: Client, server: ServerProcess, marker: str) -> tuple[bytes, bytes]:
        """-p4 of a script unique to ``marker``: (stdout, module bytes)."""
        script = f'probe begin {{ println("fleet {marker}"); exit() }}'
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", script)
        self.assertEqual(code, 0, err.decode())
        [module] = client.modules()
        path = client.cwd / module
        data = path.read_bytes()
        path.unlink()
        self.assertEqual(out.decode().strip(), module)
        return out, data

    async def test_answer_travels_between_servers_and_redis_may_go(self) -> None:
        store = start_redis(self, Path(self.mktemp()).absolute())
        a = self.fleet_server(store.url, "a")
        b = self.fleet_server(store.url, "b")
        client = self.new_client()
        await client.trust(a.spec)
        await client.trust(b.spec)

        marker = uuid.uuid4().hex
        out_a, module_a = await self.compile(client, a, marker)
        self.assertEqual(len(self.running_lines(a.log(), marker)), 1)
        out_b, module_b = await self.compile(client, b, marker)
        log_b = b.log()
        self.assertEqual(self.running_lines(log_b, marker), [], log_b)
        self.assertRegex(log_b, r"Answering \S+ from the cache \([0-9a-f]{16}\)")
        self.assertEqual(module_b, module_a, "the module is byte-identical")
        self.assertEqual(out_b, out_a)

        store.stop()
        marker = uuid.uuid4().hex
        await self.compile(client, a, marker)
        await self.compile(client, b, marker)
        log_b = b.log()
        self.assertEqual(len(self.running_lines(log_b, marker)), 1, log_b)
        self.assertEqual(len(re.findall(
            rf"Fleet cache {re.escape(store.url)} unavailable .*; compiling locally", log_b)),
            1, log_b)
        self.assertEqual(len(self.running_lines(a.log(), marker)), 1)
