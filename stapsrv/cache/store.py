"""Stored answers to repeated requests.

``ResponseCache`` is the interface the request handler uses; ``DiskCache``
is the embedded default (one file per answer under the server's state
directory, least recently used out past a size cap), ``fleet.RedisCache``
shares answers between servers, and ``TieredCache`` puts the two together.

Every stored entry is ``MAGIC``, the key it was stored under, a sha256 of
the answer, and the answer.  A reader checks all three, so a damaged entry
or one stored under another key is never sent to a client: it is dropped
and the request compiled again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from stapsrv.blocking import Blocking

MAGIC = b"stapsrv-answer-1\n"
_KEY_BYTES = 32
_DIGEST_BYTES = 32


class ResponseCache(Protocol):
    """Where answers are kept.  Neither method raises: a store that cannot
    be reached behaves as a miss (``get``) or as a no-op (``put``)."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, response: bytes) -> None: ...


class CorruptEntry(Exception):
    pass


def encode_entry(key: str, response: bytes) -> bytes:
    return MAGIC + bytes.fromhex(key) + hashlib.sha256(response).digest() + response


def decode_entry(key: str, entry: bytes) -> bytes:
    """The answer in ``entry``; ``CorruptEntry`` if it is not exactly what
    was stored under ``key``."""
    header = len(MAGIC) + _KEY_BYTES + _DIGEST_BYTES
    if len(entry) < header or not entry.startswith(MAGIC):
        raise CorruptEntry("bad header")
    stored_key = entry[len(MAGIC):len(MAGIC) + _KEY_BYTES]
    if stored_key != bytes.fromhex(key):
        raise CorruptEntry("stored under another key")
    digest = entry[len(MAGIC) + _KEY_BYTES:header]
    response = entry[header:]
    if hashlib.sha256(response).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    return response


class DiskCache:
    """Answers as files ``<directory>/<key[:2]>/<key>``, at most
    ``max_bytes`` in all; a hit refreshes the file's mtime, and the oldest
    mtimes go first when the cap is passed."""

    tier = "disk"

    def __init__(self, directory: Path, max_bytes: int, reactor: IReactorFromThreads,
                 pool: ThreadPool,
                 log: Logger | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._reactor = reactor
        self._pool = pool
        self.log = log or Logger()
        self._in_thread = Blocking(reactor, pool)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    async def get(self, key: str) -> bytes | None:
        return await self._in_thread(self.lookup, key)

    async def put(self, key: str, response: bytes) -> None:
        await self._in_thread(self.store, key, response)

    # Blocking halves, also used directly by tests and tools.

    def lookup(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            entry = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.log.warn("Cannot read cache entry {path}: {error}", path=path, error=exc)
            return None
        try:
            response = decode_entry(key, entry)
        except CorruptEntry as exc:
            self.log.warn("Damaged cache entry {path} ({problem}) removed; compiling again",
                          path=path, problem=str(exc))
            self._remove(path)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return response

    def store(self, key: str, response: bytes) -> None:
        entry = encode_entry(key, response)
        if len(entry) > self.max_bytes:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".new-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(entry)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            self.log.warn("Cannot store cache entry {path}: {error}", path=path, error=exc)
            return
        # Other servers of the same user may share the directory, so the
        # cap is checked against what is on disk.  Stores follow compiles
        # that took seconds; a directory scan is cheap beside them.
        self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry."""
        found = []
        try:
            buckets = list(os.scandir(self.directory))
        except OSError:
            return []
        for bucket in buckets:
            if not bucket.is_dir(follow_symlinks=False):
                continue
            try:
                for entry in os.scandir(bucket.path):
                    if entry.name.startswith("."):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    found.append((info.st_mtime, info.st_size, Path(entry.path)))
            except OSError:
                continue
        return found

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> int:
        """Remove least recently used entries until under the cap; the new
        total size."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size
        return total

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


async def find_answer(cache: ResponseCache, key: str) -> tuple[bytes, str] | None:
    """``cache``'s answer for ``key`` and the tier it came from (a tiered
    cache says which; another cache is its own ``tier``, else ``disk``)."""
    find = getattr(cache, "find", None)
    if find is not None:
        found: tuple[bytes, str] | None = await find(key)
        return found
    response = await cache.get(key)
    if response is None:
        return None
    return response, str(getattr(cache, "tier", "disk"))


class TieredCache:
    """A local cache in front of a shared one: hits in the shared cache are
    kept locally too, and new answers go to both."""

    def __init__(self, local: ResponseCache, shared: ResponseCache,
                 shared_tier: str = "fleet") -> None:
        self.local = local
        self.shared = shared
        self.shared_tier = shared_tier

    async def get(self, key: str) -> bytes | None:
        found = await self.find(key)
        return None if found is None else found[0]

    async def find(self, key: str) -> tuple[bytes, str] | None:
        """The answer and the tier that had it."""
        found = await find_answer(self.local, key)
        if found is not None:
            return found
        response = await self.shared.get(key)
        if response is None:
            return None
        await self.local.put(key, response)
        return response, self.shared_tier

    async def put(self, key: str, response: bytes) -> None:
        await self.local.put(key, response)
        await self.shared.put(key, response)
