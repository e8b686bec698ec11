"""Cache keys: one digest over everything that can change an answer.

A key covers the request (every member's path and bytes: script, tapsets,
arguments, locale, sysinfo, version, MOK fingerprints), the server's own
side (translator options, the translator program and its tapsets, the
runtime directory, the kernel build tree's identity files, the C compiler,
the server user's ``rc`` file and the ``SYSTEMTAP_*`` environment), the
contents of every server file or directory the request names (a script or
``-I`` path outside the request, a ``process("/usr/bin/x")`` binary in the
script text) and, for answers the server signs, the signing certificates.
Two requests share a key only if they would get the same answer; a request
naming a server tree too big to fingerprint is not cached at all.

The request's side comes parsed (:class:`KeyedRequest`: what
:class:`stapsrv.compile.job.Job` gives, seen from below).
Blocking: run in a thread pool of its own (never the requests' pool: a
key is bounded in files, bytes and seconds, but may still take seconds).
Only regular files are read, never a device, FIFO or socket, nothing in
``/proc`` or ``/sys``, and no link out of a named tree.  Server-side digests are content hashes
(so servers on different hosts with the same installation agree), kept
until a cheap stat walk shows a change; that walk runs at most once per
``recheck`` seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from attrs import define, field, frozen

#: Bump when the meaning of a key or the cached answer's format changes.
KEY_VERSION = b"stapsrv-response-cache-1\n"

#: Files that identify a kernel build tree (relative to ``build``).
BUILD_TREE_FILES = (
    ".config", "Module.symvers", "Makefile", "include/config/kernel.release",
    "include/generated/autoconf.h", "include/generated/utsrelease.h",
    "include/generated/compile.h",
)

#: Environment variables of the server that the translator or make read.
_ENVIRONMENT_PREFIXES = ("SYSTEMTAP_", "KBUILD_")
_ENVIRONMENT_NAMES = frozenset({"PATH", "ARCH", "CROSS_COMPILE", "CC", "LANG", "LC_ALL"})


#: Entries (files, directories, links) the named paths of one request may
#: hold in all: past this the answer is not cached (fingerprinting would
#: cost more than compiling).
MAX_NAMED_FILES = 2000

#: Bytes of named server files one key may read; past this the answer is
#: not cached.
MAX_NAMED_BYTES = 256 << 20

#: Seconds one key may take over named paths; past this the answer is not
#: cached.
KEY_SECONDS = 10.0

#: Named paths whose digests are remembered (least recently used ones are
#: forgotten first; a path that does not exist is never remembered).
MAX_REMEMBERED = 1024

#: Trees whose files are made by the kernel as they are read: their sizes
#: and times say nothing, and some never end.
PSEUDO_ROOTS = ("/proc", "/sys")

_CHUNK = 1 << 20


class Uncacheable(Exception):
    """The request names server files that cannot be fingerprinted."""

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(f"{reason}: {path}" if path else reason)
        self.reason = reason
        self.path = path


@define
class Budget:
    """What one key may still spend on named paths; ``None``: no bound."""

    stopping: threading.Event
    files: int | None = None
    size: int | None = None
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic

    def check(self, path: str) -> None:
        if self.stopping.is_set():
            raise Uncacheable("the server is stopping", path)
        if self.deadline is not None and self.clock() > self.deadline:
            raise Uncacheable(f"fingerprinting took longer than {KEY_SECONDS:g} s", path)

    def entry(self, path: str) -> None:
        self.check(path)
        if self.files is not None:
            self.files -= 1
            if self.files < 0:
                raise Uncacheable(f"more than {MAX_NAMED_FILES} named files", path)

    def read(self, path: str, count: int) -> None:
        self.check(path)
        if self.size is not None:
            self.size -= count
            if self.size < 0:
                raise Uncacheable(f"more than {MAX_NAMED_BYTES >> 20} MiB of named files",
                                  path)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@frozen
class _Entry:
    """One thing in a tree, as ``lstat`` saw it (never through a link)."""

    relative: str
    full: str
    info: os.stat_result
    link: str | None = None


def _entries(root: str, budget: Budget, strict: bool) -> Iterator[_Entry]:
    """``root`` and everything under it in name order, links not followed.
    ``strict``: a link that leads out of ``root`` raises ``Uncacheable``."""
    budget.entry(root)
    info = os.lstat(root)
    yield _Entry("", root, info)
    if not stat.S_ISDIR(info.st_mode):
        return
    pending = [("", root)]
    while pending:
        relative, directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                names = sorted(entry.name for entry in listing)
        except OSError:
            continue
        below = []
        for name in names:
            full = os.path.join(directory, name)
            inner = f"{relative}/{name}" if relative else name
            budget.entry(full)
            if strict and any(_inside(full, pseudo) for pseudo in PSEUDO_ROOTS):
                raise Uncacheable("a path in a kernel pseudo filesystem", full)
            try:
                info = os.lstat(full)
            except OSError:
                continue
            link = None
            if stat.S_ISLNK(info.st_mode):
                try:
                    link = os.readlink(full)
                except OSError:
                    link = ""
                if strict and not _inside(os.path.realpath(full), root):
                    raise Uncacheable("a link out of the named tree", full)
            yield _Entry(inner, full, info, link)
            if stat.S_ISDIR(info.st_mode):
                below.append((inner, full))
        pending.extend(reversed(below))


def _signature(entries: Iterable[_Entry]) -> bytes:
    """A cheap digest of a tree: names, kinds, sizes, inodes, mtimes and
    ctimes (a copy that restores an old mtime still gets a new ctime)."""
    digest = hashlib.sha256()
    for entry in entries:
        info = entry.info
        digest.update(repr((entry.relative, info.st_mode, info.st_size, info.st_ino,
                            info.st_mtime_ns, info.st_ctime_ns, entry.link)).encode(
                                "utf-8", "surrogateescape"))
    return digest.digest()


def _content(entries: Iterable[_Entry], budget: Budget) -> bytes:
    """sha256 over a tree's relative names, kinds and contents: regular
    files' bytes, links' text, special files' kind and device number
    (those are never opened)."""
    digest = hashlib.sha256()
    for entry in entries:
        name = os.fsencode(entry.relative)
        mode = entry.info.st_mode
        digest.update(b"%d:%s" % (len(name), name))
        if stat.S_ISREG(mode):
            digest.update(b"f")
            _hash_file(digest, entry.full, budget)
        elif stat.S_ISDIR(mode):
            digest.update(b"d")
        elif entry.link is not None:
            target = os.fsencode(entry.link)
            digest.update(b"l%d:%s" % (len(target), target))
        else:
            digest.update(b"s%o:%d" % (stat.S_IFMT(mode), entry.info.st_rdev))
    return digest.digest()


def _hash_file(digest: "hashlib._Hash", path: str, budget: Budget) -> None:
    """A regular file's bytes, read without blocking on anything that is
    not one (it may have been swapped for a FIFO since ``lstat``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        digest.update(b"unreadable:%d" % (exc.errno or 0))
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            digest.update(b"changed")
            return
        while True:
            budget.check(path)
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            budget.read(path, len(chunk))
            digest.update(chunk)
    except OSError as exc:
        digest.update(b"unreadable:%d" % (exc.errno or 0))
    finally:
        os.close(fd)


@define
class _Remembered:
    signature: bytes
    digest: bytes


_MISSING = hashlib.sha256(b"missing").digest()


@define
class ContentDigests:
    """Content digests of server-side files and trees, recomputed only when
    their stat signature changes; server paths are checked at most once per
    ``recheck`` s, named ones on every request.  At most ``remember`` paths
    are remembered (least recently used first out).  Safe to use from
    several threads; :meth:`stop` makes every digest being computed raise
    ``Uncacheable`` at its next file or MiB."""

    recheck: float = 1.0
    clock: Callable[[], float] = time.monotonic
    remember: int = MAX_REMEMBERED
    _remembered: OrderedDict[str, _Remembered] = field(factory=OrderedDict)
    _checked: dict[str, float] = field(factory=dict)
    _lock: threading.Lock = field(factory=threading.Lock)
    stopping: threading.Event = field(factory=threading.Event)

    def __len__(self) -> int:
        return len(self._remembered)

    def stop(self) -> None:
        self.stopping.set()

    def budget(self) -> Budget:
        """A fresh allowance for the named paths of one key."""
        return Budget(self.stopping, MAX_NAMED_FILES, MAX_NAMED_BYTES,
                      self.clock() + KEY_SECONDS, self.clock)

    def named_digest(self, path: Path, budget: Budget | None = None) -> bytes:
        """A path a request or a server option names: checked on every
        request (such files are edited by hand, between two requests),
        within ``budget``; a link is followed to what it names (whose real
        path counts), but never out of a named tree.  Raises
        ``Uncacheable`` when the path cannot be fingerprinted."""
        budget = budget or self.budget()
        budget.check(str(path))
        real = os.path.realpath(path)
        if any(_inside(real, root) for root in PSEUDO_ROOTS):
            raise Uncacheable("a path in a kernel pseudo filesystem", str(path))
        named = os.fsencode(real)
        return hashlib.sha256(b"%d:%s" % (len(named), named)
                              + self._digest(real, budget, strict=True, recheck=0.0)).digest()

    def digest(self, path: Path, recheck: float | None = None) -> bytes:
        """A server path (the translator, its tapsets, the build tree's
        files): links are not followed inside trees."""
        budget = Budget(self.stopping, clock=self.clock)
        return self._digest(str(path), budget, strict=False, recheck=recheck)

    def _digest(self, path: str, budget: Budget, strict: bool,
                recheck: float | None) -> bytes:
        now = self.clock()
        interval = self.recheck if recheck is None else recheck
        with self._lock:
            known = self._remembered.get(path)
            if known is not None:
                self._remembered.move_to_end(path)
                if now - self._checked.get(path, -1e18) < interval:
                    return known.digest
        try:
            entries = list(_entries(path, budget, strict))
        except FileNotFoundError:
            self._forget(path)
            return _MISSING
        except OSError as exc:
            self._forget(path)
            return hashlib.sha256(b"unreadable:%d" % (exc.errno or 0)).digest()
        signature = _signature(entries)
        if known is None or known.signature != signature:
            known = _Remembered(signature, _content(entries, budget))
        with self._lock:
            self._remembered[path] = known
            self._remembered.move_to_end(path)
            self._checked[path] = now
            while len(self._remembered) > self.remember:
                forgotten, _ = self._remembered.popitem(last=False)
                self._checked.pop(forgotten, None)
        return known.digest

    def _forget(self, path: str) -> None:
        with self._lock:
            self._remembered.pop(path, None)
            self._checked.pop(path, None)


def relevant_environment(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted((name, value) for name, value in environ.items()
                  if name in _ENVIRONMENT_NAMES or name.startswith(_ENVIRONMENT_PREFIXES))


class KeyedRequest(Protocol):
    """What a key reads of a parsed request."""

    @property
    def digest(self) -> bytes:
        """A digest of every member's path and bytes."""

    @property
    def named_paths(self) -> tuple[str, ...]:
        """The server paths the request names."""

    @property
    def uncacheable(self) -> str | None:
        """Why the request may not be cached, or None."""


@define
class KeyMaker:
    """Builds cache keys for one server."""

    stap: str
    modules_root: Path
    environ: Mapping[str, str]
    rc_file: Path
    digests: ContentDigests = field(factory=ContentDigests)

    def server_paths(self, runtime: str | None, release: str, build: Path | None = None,
                     symbols: Path | None = None) -> list[tuple[str, Path]]:
        """The server files a compile for ``release`` reads; ``build`` is
        its build tree when that is not the installed one (the kernel store),
        ``symbols`` the System.map the server fetched for it."""
        stap = Path(self.stap)
        share = stap.resolve().parent.parent / "share" / "systemtap"
        compiler = shutil.which("gcc", path=self.environ.get("PATH")) or "/usr/bin/gcc"
        build = build or self.modules_root / release / "build"
        paths = [("stap", stap), ("tapsets", share / "tapset"),
                 ("runtime", Path(runtime) if runtime else share / "runtime"),
                 ("compiler", Path(compiler).resolve()), ("rc", self.rc_file)]
        paths += [("build:" + name, build / name) for name in BUILD_TREE_FILES]
        if symbols is not None:
            paths.append(("symbols", symbols))
        return paths

    def key(self, request: KeyedRequest, release: str, options: Sequence[str],
            runtime: str | None, signers: Iterable[bytes] = (),
            build: Path | None = None, symbols: Path | None = None) -> str:
        """The hex key of a request about to be run with ``options``.

        ``signers`` are the certificates (DER or PEM bytes) whose keys sign
        this answer: the server's own for unprivileged requests, the MOK
        store's for Secure Boot clients.
        """
        if request.uncacheable is not None:
            raise Uncacheable(request.uncacheable)
        budget = self.digests.budget()
        digest = hashlib.sha256(KEY_VERSION)
        digest.update(b"request:" + request.digest)
        digest.update(b"release:%s\n" % release.encode())
        for option in options:
            digest.update(b"option:%d:%s" % (len(option.encode()), option.encode()))
        for name, value in relevant_environment(self.environ):
            digest.update(b"env:%s=%s\n" % (name.encode(), value.encode("utf-8", "replace")))
        for label, path in self.server_paths(runtime, release, build, symbols):
            digest.update(b"%s:" % label.encode() + self.digests.digest(path))
        for option in options:
            if option.startswith("-I") and len(option) > 2:
                # The server's own tapset directories: their contents count.
                digest.update(b"server-tapsets:" + self.digests.named_digest(
                    Path(option[2:]), budget))
        for name in request.named_paths:
            encoded = os.fsencode(name)
            digest.update(b"named:%d:%s" % (len(encoded), encoded))
            digest.update(self.digests.named_digest(Path(name), budget))
        for signer in signers:
            digest.update(b"signer:" + hashlib.sha256(signer).digest())
        return digest.hexdigest()
