"""The fleet cache: answers shared by many servers through Redis.

Entries are sealed (``sealed``: HMAC-SHA-256 under the fleet secret, bound
to their key) and kept under ``stapsrv:answer:<key>`` with an expiry; the
total size is Redis's business (run it with ``maxmemory`` and
``maxmemory-policy allkeys-lru``).  An entry is at most ``MAX_ENTRY_BYTES``:
its size is asked (``STRLEN``) before it is fetched, and the fetch itself
(``GETRANGE``) takes no more than that, so a planted giant never reaches
the server's memory.  An entry that is too large or does not open under
the secret is refused, removed, logged once per key, and the request
compiled again; it never reaches a client or the local cache.

Redis calls are blocking (redis-py) and run in the reactor's thread pool,
never in the pool that handles requests, each bounded by a short socket
timeout.  When Redis cannot be reached the cache behaves as empty: one
warning, the servers compile locally, calls are skipped for ``retry``
seconds, and a line is logged when Redis answers again.  No request fails
because of it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from stapsrv.blocking import Blocking
from stapsrv.cache.sealed import RefusedEntry, entry_size, open_entry, seal
from stapsrv.config.fleeturl import display_url

PREFIX = "stapsrv:answer:"
#: Where the members of a fleet elect the one that does a piece of work.
ELECTION_PREFIX = "stapsrv:claim:"
#: The holder's last word, at once: a new value kept for a while, or the
#: name handed back ("" as the value), only while the token still holds it.
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""
#: Seconds an answer stays in Redis unless Redis evicts it first.
DEFAULT_TTL = 30 * 24 * 3600
#: Largest entry fetched or stored, in bytes (a compiled answer is a zip of
#: one module, well under this).
MAX_ENTRY_BYTES = 32 * 1024 * 1024
#: Keys whose refusal has been logged, remembered (most recent) to log each once.
_REFUSALS_REMEMBERED = 4096


class RedisCache:
    """A ``ResponseCache`` in Redis."""

    def __init__(self, url: str, reactor: IReactorThreads, *, secret: bytes,
                 password: str | None = None, log: Logger | None = None,
                 timeout: float = 1.0, retry: float = 5.0, ttl: int = DEFAULT_TTL,
                 max_entry: int = MAX_ENTRY_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        options: dict[str, object] = {}
        if password is not None:
            options["password"] = password
        if urlsplit(url).scheme == "rediss":
            # Older redis-py did not check the name by default; the URL's
            # ?ssl_check_hostname= still decides.
            options["ssl_check_hostname"] = True
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0, **options)
        self.display_url = display_url(url)
        self._reactor = reactor
        self._in_thread = Blocking(reactor, reactor.getThreadPool())
        self._secret = secret
        self.log = log or Logger()
        self.retry = retry
        self.ttl = ttl
        self.max_entry = max_entry
        self._clock = clock
        self._down_until: float | None = None
        self._warned = False
        self._refused: OrderedDict[str, None] = OrderedDict()

    @property
    def available(self) -> bool:
        return self._down_until is None or self._clock() >= self._down_until

    async def get(self, key: str, prefix: str = PREFIX) -> bytes | None:
        if not self.available:
            return None
        return await self._in_thread(self.lookup, key, prefix)

    async def put(self, key: str, response: bytes, prefix: str = PREFIX) -> None:
        if not self.available:
            return
        await self._in_thread(self.store, key, response, prefix)

    def lookup(self, key: str, prefix: str = PREFIX) -> bytes | None:
        name = prefix + key
        try:
            size = self._client.strlen(name)
            if not isinstance(size, int) or size == 0:  # 0: no such entry
                self._worked()
                return None
            if size > self.max_entry:
                self._worked()
                self._refuse(key, f"{size} bytes, over the limit of {self.max_entry}", prefix)
                return None
            # Bounded even if the entry grew since STRLEN: what is cut
            # short does not open.
            entry = self._client.getrange(name, 0, self.max_entry - 1)
        except self._redis_errors as exc:
            self._failed(exc)
            return None
        self._worked()
        if not entry:
            return None  # expired or removed since STRLEN
        assert isinstance(entry, bytes)  # the client does not decode responses
        try:
            return open_entry(self._secret, key, entry)
        except RefusedEntry as exc:
            self._refuse(key, str(exc), prefix)
            return None

    def _refuse(self, key: str, problem: str, prefix: str = PREFIX) -> None:
        """Remove an entry that is not served; log it, once per key."""
        if key in self._refused:
            self._refused.move_to_end(key)
        else:
            self._refused[key] = None
            if len(self._refused) > _REFUSALS_REMEMBERED:
                self._refused.popitem(last=False)
            self.log.warn("Refused fleet cache entry {key} ({problem}); compiling again",
                          key=key[:16], problem=problem)
        try:
            self._client.delete(prefix + key)
        except self._redis_errors:
            pass

    def store(self, key: str, response: bytes, prefix: str = PREFIX) -> None:
        if entry_size(response) > self.max_entry:
            return  # kept locally only
        try:
            self._client.set(prefix + key, seal(self._secret, key, response), ex=self.ttl)
        except self._redis_errors as exc:
            self._failed(exc)
            return
        self._worked()

    # --- the election of the member that does a piece of work (#29) ---------

    async def claim(self, name: str, token: str, milliseconds: int) -> bool | None:
        """Whether this server won ``name`` (``SET NX PX``: the first to ask
        holds it for ``milliseconds``, unless it hands it back); None when
        Redis cannot be asked (each server then decides alone)."""
        if not self.available:
            return None
        return await self._in_thread(self._claim, name, token, milliseconds)

    def _claim(self, name: str, token: str, milliseconds: int) -> bool | None:
        try:
            won = self._client.set(ELECTION_PREFIX + name, token.encode(), nx=True,
                                   px=milliseconds)
        except self._redis_errors as exc:
            self._failed(exc)
            return None
        self._worked()
        return bool(won)

    async def holder(self, name: str) -> str | None:
        """Who holds ``name`` now (None: nobody, or Redis cannot be asked)."""
        if not self.available:
            return None
        return await self._in_thread(self._holder, name)

    def _holder(self, name: str) -> str | None:
        try:
            value = self._client.get(ELECTION_PREFIX + name)
        except self._redis_errors as exc:
            self._failed(exc)
            return None
        self._worked()
        return value.decode(errors="replace") if isinstance(value, bytes) else None

    async def settle(self, name: str, token: str, value: str | None,
                     milliseconds: int) -> None:
        """The holder's last word on ``name``: ``value`` kept for
        ``milliseconds`` (the others go on skipping the work), or with
        ``value`` None, ``name`` handed back (another may take it).  Only
        while ``token`` still holds it (a claim that expired meanwhile is
        someone else's)."""
        if self.available:
            await self._in_thread(self._settle, name, token, value, milliseconds)

    def _settle(self, name: str, token: str, value: str | None, milliseconds: int) -> None:
        try:
            self._client.eval(_SETTLE, 1, ELECTION_PREFIX + name, token, value or "",
                              milliseconds)
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
