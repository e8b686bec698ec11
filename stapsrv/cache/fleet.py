"""The fleet cache: answers shared by many servers through Redis.

Entries use the same self-checking format as the disk cache (``store``),
under ``stapsrv:answer:<key>`` with an expiry; size is Redis's business
(run it with ``maxmemory`` and ``maxmemory-policy allkeys-lru``).  Redis
calls are blocking (redis-py) and run in the reactor's thread pool, never
in the pool that handles requests, each bounded by a short socket timeout.

When Redis cannot be reached the cache behaves as empty: one warning, the
servers compile locally, calls are skipped for ``retry`` seconds, and a
line is logged when Redis answers again.  No request fails because of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from stapsrv.cache.store import CorruptEntry, decode_entry, encode_entry

T = TypeVar("T")

PREFIX = "stapsrv:answer:"
#: Seconds an answer stays in Redis unless Redis evicts it first.
DEFAULT_TTL = 30 * 24 * 3600


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a Redis server, or None when it can."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return (f"the fleet cache {url!r} is not a redis://HOST:PORT/DB, rediss:// or "
                f"unix:// URL")
    if parts.scheme != "unix" and not parts.hostname:
        return f"the fleet cache URL {url!r} names no host"
    return None


def display_url(url: str) -> str:
    """The URL with any password left out, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisCache:
    """A ``ResponseCache`` in Redis."""

    def __init__(self, url: str, reactor: IReactorThreads, log: Logger | None = None,
                 timeout: float = 1.0, retry: float = 5.0, ttl: int = DEFAULT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0)
        self.display_url = display_url(url)
        self._reactor = reactor
        self.log = log or Logger()
        self.retry = retry
        self.ttl = ttl
        self._clock = clock
        self._down_until: float | None = None
        self._warned = False

    def _in_thread(self, function: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function, *args)

    @property
    def available(self) -> bool:
        return self._down_until is None or self._clock() >= self._down_until

    async def get(self, key: str) -> bytes | None:
        if not self.available:
            return None
        return await self._in_thread(self.lookup, key)

    async def put(self, key: str, response: bytes) -> None:
        if not self.available:
            return
        await self._in_thread(self.store, key, response)

    def lookup(self, key: str) -> bytes | None:
        try:
            entry = self._client.get(PREFIX + key)
        except self._redis_errors as exc:
            self._failed(exc)
            return None
        self._worked()
        if entry is None:
            return None
        assert isinstance(entry, bytes)  # the client does not decode responses
        try:
            return decode_entry(key, entry)
        except CorruptEntry as exc:
            self.log.warn("Damaged fleet cache entry {key} ({problem}) removed; compiling again",
                          key=key[:16], problem=str(exc))
            try:
                self._client.delete(PREFIX + key)
            except self._redis_errors:
                pass
            return None

    def store(self, key: str, response: bytes) -> None:
        try:
            self._client.set(PREFIX + key, encode_entry(key, response), ex=self.ttl)
        except self._redis_errors as exc:
            self._failed(exc)
            return
        self._worked()

    def _failed(self, error: BaseException) -> None:
        self._down_until = self._clock() + self.retry
        if not self._warned:
            self._warned = True
            self.log.warn("Fleet cache {url} unavailable ({error}); compiling locally "
                          "until it answers again", url=self.display_url, error=error)

    def _worked(self) -> None:
        self._down_until = None
        if self._warned:
            self._warned = False
            self.log.info("Fleet cache {url} is answering again", url=self.display_url)

    def close(self) -> None:
        try:
            self._client.close()
        except self._redis_errors:
            pass
