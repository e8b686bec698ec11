"""The fleet cache (stapsrv.cache.fleet) against a real redis-server on loopback:
round trips, forged, moved and oversized entries, TLS and a password, Redis
going away and coming back, two handlers sharing answers, and real stapsrv
servers with the real client."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from stapsrv.cache.fleet import MAX_ENTRY_BYTES, PREFIX, RedisCache
from stapsrv.cache.sealed import open_entry, seal
from stapsrv.cache.store import DiskCache, TieredCache, decode_entry
from stapsrv.compile.handler import RequestHandler
from stapsrv.config.fleeturl import display_url
from stapsrv.config.secret import create_secret, load_secret
from stapsrv.kernel.runtime import select_runtime
from stapsrv.paths import build_tree
from tests.helpers.archives import request
from tests.helpers.handlers import KEY_A, KEY_B, CachedHandlerCase, Events
from tests.helpers.realclient import RealClientMixin
from tests.helpers.waiting import poll
from tests.helpers.realredis import RedisServer, free_port, make_tls_files, start_redis
from tests.helpers.realserver import (
    Client,
    ServerProcess,
    remove_tree,
    scratch_directory,
    test_user,
)

UNAVAILABLE = "unavailable"
AGAIN = "is answering again"
REFUSED = "Refused fleet cache entry"
SECRET = bytes(range(32))
#: Another fleet's secret: what an attacker without the secret can seal with.
FORGER = os.urandom(32)


def direct_client(store: RedisServer) -> "redis.Redis[bytes]":
    return redis.Redis(**store.client_options())  # type: ignore[arg-type]


def commands_made(client: Any, *names: str) -> int:
    """Calls of these Redis commands since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


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
        self.assertEqual(display_url("rediss://h:1/0?ssl_ca_certs=/ca.pem"),
                         "rediss://h:1/0?ssl_ca_certs=/ca.pem")


class RedisCacheTests(TestCase):
    """RedisCache over a real redis-server."""

    def setUp(self) -> None:
        self.redis = start_redis(self, Path(self.mktemp()).absolute())
        self.log = Events()
        self.direct = direct_client(self.redis)
        self.addCleanup(self.direct.close)

    def fleet(self, **options: Any) -> RedisCache:
        options.setdefault("secret", SECRET)
        cache = RedisCache(self.redis.url, reactor, log=Logger(observer=self.log), **options)
        self.addCleanup(cache.close)
        return cache

    async def test_put_then_get(self) -> None:
        cache = self.fleet()
        self.assertIsNone(await cache.get(KEY_A))
        await cache.put(KEY_A, b"PK answer")
        self.assertEqual(await cache.get(KEY_A), b"PK answer")
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(self.direct.get(PREFIX + KEY_A), seal(SECRET, KEY_A, b"PK answer"))

    async def test_another_server_sees_the_answer(self) -> None:
        await self.fleet().put(KEY_A, b"PK shared")
        self.assertEqual(await self.fleet().get(KEY_A), b"PK shared")

    async def test_entries_expire(self) -> None:
        await self.fleet(ttl=100).put(KEY_A, b"PK answer")
        self.assertTrue(0 < self.direct.ttl(PREFIX + KEY_A) <= 100)

    async def test_damaged_value_is_deleted(self) -> None:
        cache = self.fleet()
        entry = bytearray(seal(SECRET, KEY_A, b"PK answer"))
        entry[-1] ^= 0x01
        self.direct.set(PREFIX + KEY_A, bytes(entry))
        self.assertIsNone(await cache.get(KEY_A))
        self.assertEqual(self.direct.exists(PREFIX + KEY_A), 0, "deleted from Redis")
        [line] = self.log.matching(REFUSED)
        self.assertIn("not authenticated", line)

    async def test_forged_entry_is_refused_and_logged_once(self) -> None:
        """Right key, sealed without the fleet's secret: never served; the
        log says why once, however often it is planted again."""
        cache = self.fleet()
        for _ in range(3):
            self.direct.set(PREFIX + KEY_A, seal(FORGER, KEY_A, b"PK forged"))
            self.assertIsNone(await cache.get(KEY_A))
            self.assertEqual(self.direct.exists(PREFIX + KEY_A), 0)
        [line] = self.log.matching(REFUSED)
        self.assertIn(KEY_A[:16], line)
        self.assertIn("not authenticated: forged, moved from another key", line)
        self.direct.set(PREFIX + KEY_B, seal(FORGER, KEY_B, b"PK forged"))
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(len(self.log.matching(REFUSED)), 2, "once per key")
        await cache.put(KEY_A, b"PK genuine")
        self.assertEqual(await cache.get(KEY_A), b"PK genuine")

    async def test_unsealed_entry_is_refused(self) -> None:
        """What the fleet stored before entries were sealed (and what anyone
        can compute without the secret) is refused too."""
        from stapsrv.cache.store import encode_entry
        self.direct.set(PREFIX + KEY_A, encode_entry(KEY_A, b"PK old"))
        self.assertIsNone(await self.fleet().get(KEY_A))
        self.assertIn("not a stapsrv fleet entry of format 1", self.log.matching(REFUSED)[0])

    async def test_value_of_another_key_is_refused(self) -> None:
        cache = self.fleet()
        await cache.put(KEY_A, b"PK answer A")
        self.direct.set(PREFIX + KEY_B, self.direct.get(PREFIX + KEY_A))
        self.assertIsNone(await cache.get(KEY_B))
        self.assertEqual(self.direct.exists(PREFIX + KEY_B), 0)
        self.assertIn("moved from another key", self.log.matching(REFUSED)[0])
        self.assertEqual(await cache.get(KEY_A), b"PK answer A")

    async def test_oversized_entry_is_refused_without_being_fetched(self) -> None:
        cache = self.fleet()
        self.assertEqual(cache.max_entry, MAX_ENTRY_BYTES)
        # Made inside Redis (SETRANGE pads with zeros): the test does not
        # hold it either.
        self.direct.setrange(PREFIX + KEY_A, MAX_ENTRY_BYTES, b"x")
        self.direct.config_resetstat()
        self.assertIsNone(await cache.get(KEY_A))
        self.assertEqual(commands_made(self.direct, "get", "getrange", "getex", "substr",
                                       "getdel", "dump"), 0, "never fetched")
        self.assertEqual(commands_made(self.direct, "strlen"), 1)
        self.assertEqual(self.direct.exists(PREFIX + KEY_A), 0, "removed")
        [line] = self.log.matching(REFUSED)
        self.assertIn(f"{MAX_ENTRY_BYTES + 1} bytes, over the limit of {MAX_ENTRY_BYTES}", line)

    async def test_fetch_is_bounded_and_large_answers_stay_local(self) -> None:
        cache = self.fleet(max_entry=1000)
        await cache.put(KEY_A, b"P" * 2000)
        self.assertEqual(self.direct.exists(PREFIX + KEY_A), 0, "not stored in the fleet")
        await cache.put(KEY_B, b"P" * 900)
        self.direct.config_resetstat()
        self.assertEqual(await cache.get(KEY_B), b"P" * 900)
        self.assertEqual(commands_made(self.direct, "getrange"), 1)
        self.assertEqual(commands_made(self.direct, "get"), 0)

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
        cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", reactor, secret=SECRET,
                           log=Logger(observer=self.log), retry=0.1)
        self.addCleanup(cache.close)
        for _ in range(3):
            self.assertIsNone(await cache.get(KEY_A))
            await cache.put(KEY_A, b"PK")
            await sleep(0.15)
        self.assertEqual(len(self.log.matching(UNAVAILABLE)), 1)


class TlsTests(TestCase):
    """rediss:// to a TLS-enabled redis-server that wants a password."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.tls = make_tls_files(base / "tls")
        self.redis = start_redis(self, base / "redis", password="pw-" + uuid.uuid4().hex,
                                 tls=self.tls)
        self.log = Events()

    def fleet(self, url: str, password: str | None) -> RedisCache:
        cache = RedisCache(url, reactor, secret=SECRET, password=password,
                           log=Logger(observer=self.log))
        self.addCleanup(cache.close)
        return cache

    async def test_round_trip_over_tls(self) -> None:
        self.assertTrue(self.redis.url.startswith("rediss://"))
        cache = self.fleet(self.redis.url, self.redis.password)
        await cache.put(KEY_A, b"PK over TLS")
        self.assertEqual(await self.fleet(self.redis.url, self.redis.password).get(KEY_A),
                         b"PK over TLS")
        self.assertEqual(self.log.lines(), [])

    async def test_wrong_password_or_untrusted_certificate(self) -> None:
        await self.fleet(self.redis.url, "wrong").put(KEY_A, b"PK")
        stranger = make_tls_files(Path(self.mktemp()).absolute())
        untrusted = self.redis.url.replace(str(self.tls.ca), str(stranger.ca))
        self.assertIsNone(await self.fleet(untrusted, self.redis.password).get(KEY_A))
        lines = self.log.matching(UNAVAILABLE)
        self.assertEqual(len(lines), 2, self.log.lines())
        self.assertRegex(lines[0], "(?i)auth|password")
        self.assertIn("certificate verify failed", lines[1])
        for line in self.log.lines():
            self.assertNotIn(self.redis.password or "-", line)


class FleetHandlerTests(CachedHandlerCase):
    """Two servers (handlers with their own disk caches) and one Redis."""

    def setUp(self) -> None:
        super().setUp()
        self.redis = start_redis(self, self.base / "redis")

    def server(self, name: str, retry: float = 5.0) -> tuple[RequestHandler, DiskCache, RedisCache]:
        local = DiskCache(self.base / f"cache-{name}", 1 << 24, reactor, self.pool,
                          Logger(observer=self.cache_log))
        fleet = RedisCache(self.redis.url, reactor, secret=SECRET,
                           log=Logger(observer=self.cache_log), retry=retry)
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
        self.assertEqual(len(self.cache_log.matching(REFUSED)), 1)

    async def test_forged_fleet_entry_is_never_served_nor_kept(self) -> None:
        """An answer planted without the secret: the other server compiles,
        and what its disk cache keeps is its own answer."""
        a, _, _ = self.server("a")
        b, local_b, _ = self.server("b")
        body = request("-p4", "-eprobe begin { forged }")
        genuine = await self.raw(a, body)
        direct = direct_client(self.redis)
        self.addCleanup(direct.close)
        [name] = direct.keys(PREFIX + "*")
        key = name.decode()[len(PREFIX):]
        forged = b"PK\x03\x04 planted module"
        direct.set(name, seal(FORGER, key, forged))
        answer = await self.raw(b, body)
        self.assertEqual(self.runs(), 2, "compiled again")
        self.assertNotEqual(answer, forged)
        self.assertGoodModule(answer)
        [(_, _, path)] = local_b.entries()
        self.assertNotIn(b"planted module", path.read_bytes())
        self.assertEqual(len(self.cache_log.matching(REFUSED)), 1)
        self.assertEqual(open_entry(SECRET, key, direct.get(name)), decode_entry(
            key, path.read_bytes()), "the fleet has b's genuine answer again")
        self.assertNotEqual(genuine, forged)


class FleetServersTests(RealClientMixin, TestCase):
    """Real stapsrv servers sharing a real Redis, and the real client."""

    timeout = 900

    def setUp(self) -> None:
        super().setUp()
        self.private = scratch_directory("fleet-files-")
        self.addCleanup(remove_tree, self.private)
        self.secret = self.private / "fleet.secret"
        user = test_user()
        create_secret(self.secret, owner=(user.pw_uid, user.pw_gid))

    def private_file(self, name: str, text: str) -> Path:
        """A file only the server user reads."""
        path = self.private / name
        path.write_text(text)
        path.chmod(0o600)
        user = test_user()
        os.chown(path, user.pw_uid, user.pw_gid)
        return path

    def fleet_server(self, redis_url: str, name: str, *extra: str,
                     env: dict[str, str] | None = None) -> ServerProcess:
        cache_dir = scratch_directory(f"fleet-{name}-")
        self.addCleanup(remove_tree, cache_dir)
        return self.own_server("--fleet-cache", redis_url, "--fleet-secret", str(self.secret),
                               "--cache-dir", str(cache_dir), *extra, env=env)

    @staticmethod
    def running_lines(log: str, marker: str) -> list[str]:
        return [line for line in log.splitlines() if "Running [" in line and marker in line]

    async def compile(self, client: Client, server: ServerProcess, marker: str) -> tuple[bytes, bytes]:
        """-p4 of a script unique to ``marker``: (stdout, module bytes)."""
        script = f'probe begin {{ println("fleet {marker}"); exit() }}'
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", script)
        # Should it fail, the server's side of the story too (the client
        # only says "Unable to connect to a server").
        self.assertEqual(code, 0, f"{err.decode()}\nserver {server.spec} (exit "
                         f"{server.exit_code}), its log's end:\n{server.log()[-3000:]}")
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

    async def test_a_second_member_takes_the_first_ones_configuration_header(self) -> None:
        """Each member has a kernel configuration header store of its own
        (as on another host); the first warms the release up at start and
        shares the header; the second takes it from the fleet cache instead
        of a warm-up of its own, and compiles with it.  Both run the same
        fixed runtime (-R): the translator names the header after the
        runtime's path and time, as the same package gives every host."""
        store = start_redis(self, Path(self.mktemp()).absolute())
        runtimes = scratch_directory("fleet-runtime-")
        self.addCleanup(remove_tree, runtimes)
        fixed = select_runtime(build_tree(self.release), cache_root=runtimes)
        extra = ("-R", str(fixed)) if fixed is not None else ()
        caches = [scratch_directory(f"fleet-xdg-{name}-") for name in "ab"]
        for cache in caches:
            self.addCleanup(remove_tree, cache)
        header = f"Kernel configuration header for {self.release}"
        a = self.fleet_server(store.url, "a", *extra, env={"XDG_CACHE_HOME": str(caches[0])})
        # A net for a test gone wrong, never a measure of the warm-up's speed.
        shared = await poll(lambda: "shared through the fleet cache" in a.log()
                            or "warm-up compile for kernel" in a.log(), 850)
        self.assertTrue(shared, a.log()[-3000:])
        self.assertIn(f"{header} shared through the fleet cache", a.log())
        b = self.fleet_server(store.url, "b", *extra, env={"XDG_CACHE_HOME": str(caches[1])})
        took = await poll(lambda: header in b.log(), 850)
        self.assertTrue(took, b.log()[-3000:])
        log_b = b.log()
        self.assertIn(f"{header} ready from the fleet cache", log_b)
        self.assertNotIn(f"{header} ready in", log_b)
        self.assertTrue(list((caches[1] / "stapsrv" / "stapconf").glob("*/stapconf_*.h")))
        client = self.new_client()
        await client.trust(b.spec)
        await self.compile(client, b, uuid.uuid4().hex)

    async def test_forged_and_moved_entries_are_never_served(self) -> None:
        """Whoever can write to Redis plants, under the key of script X, the
        module of script Y: moved as it is (sealed for Y's key), or sealed
        again without the fleet's secret.  The client still gets X's module,
        freshly compiled, and the log says once why."""
        store = start_redis(self, Path(self.mktemp()).absolute())
        direct = direct_client(store)
        self.addCleanup(direct.close)
        a = self.fleet_server(store.url, "a")
        b = self.fleet_server(store.url, "b")
        client = self.new_client()
        await client.trust(a.spec)
        await client.trust(b.spec)

        def newest_key(known: set[bytes]) -> bytes:
            [name] = set(direct.keys(PREFIX + "*")) - known
            known.add(name)
            return name

        known: set[bytes] = set()
        x, y, z = (uuid.uuid4().hex for _ in range(3))
        out_x, _ = await self.compile(client, a, x)
        key_x = newest_key(known)
        out_y, _ = await self.compile(client, a, y)
        key_y = newest_key(known)
        self.assertNotEqual(out_x, out_y)
        entry_y = direct.get(key_y)
        direct.set(key_x, entry_y)  # moved: a genuine entry, another key
        out, _ = await self.compile(client, b, x)
        self.assertEqual(out, out_x, "X's module, not Y's")
        log_b = b.log()
        self.assertEqual(len(self.running_lines(log_b, x)), 1, log_b)

        await self.compile(client, a, z)
        key_z = newest_key(known)
        answer_y = open_entry(load_secret(self.secret), key_y.decode()[len(PREFIX):], entry_y)
        direct.set(key_z, seal(FORGER, key_z.decode()[len(PREFIX):], answer_y))
        out, _ = await self.compile(client, b, z)
        self.assertNotEqual(out, out_y, "not the planted module")
        log_b = b.log()
        self.assertEqual(len(self.running_lines(log_b, z)), 1, log_b)
        refusals = [line for line in log_b.splitlines() if REFUSED in line]
        self.assertEqual(len(refusals), 2, log_b)
        for line in refusals:
            self.assertIn("not authenticated: forged, moved from another key", line)
        self.assertIn(key_x.decode()[len(PREFIX):][:16], refusals[0])
        self.assertIn(key_z.decode()[len(PREFIX):][:16], refusals[1])

    async def test_tls_and_a_password_from_a_file(self) -> None:
        """rediss:// with a password file: a second server on another cache
        directory gets a fleet hit; the password is on no command line and
        in no log."""
        password = "pw-" + uuid.uuid4().hex
        tls = make_tls_files(self.private / "tls")
        store = start_redis(self, Path(self.mktemp()).absolute(), password=password, tls=tls)
        password_file = self.private_file("redis.password", password + "\n")
        a = self.fleet_server(store.url, "a", "--fleet-password-file", str(password_file))
        b = self.fleet_server(store.url, "b", "--fleet-password-file", str(password_file))
        client = self.new_client()
        await client.trust(a.spec)
        await client.trust(b.spec)

        marker = uuid.uuid4().hex
        _, module_a = await self.compile(client, a, marker)
        _, module_b = await self.compile(client, b, marker)
        log_b = b.log()
        self.assertEqual(self.running_lines(log_b, marker), [], log_b)
        self.assertEqual(module_b, module_a)
        self.assertIn(f"Fleet cache {store.url} (entries authenticated", log_b)
        self.assertNotIn(UNAVAILABLE, log_b)
        for server in (a, b):
            self.assertIn(store.url.encode(), Path(f"/proc/{server.pid}/cmdline").read_bytes())
            self.assertNotIn(password.encode(), Path(f"/proc/{server.pid}/cmdline").read_bytes())
            self.assertNotIn(password, server.log() + server.output())
