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

The request's side comes parsed (:class:`stapsrv.compile.job.Job`).
Blocking: run in the thread pool.  Server-side digests are content hashes
(so servers on different hosts with the same installation agree), kept
until a cheap stat walk shows a change; that walk runs at most once per
``recheck`` seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from attrs import define, field

from stapsrv.compile.job import Job

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


#: A named server directory with more files than this makes a request
#: uncacheable (fingerprinting it would cost more than compiling).
MAX_NAMED_FILES = 2000


class Uncacheable(Exception):
    """The request names server files that cannot be fingerprinted."""


def _stat_walk(path: Path) -> tuple[object, ...]:
    """A cheap signature of a file or tree: names, sizes, inodes, mtimes and
    ctimes (a copy that restores an old mtime still gets a new ctime)."""
    try:
        top = path.stat()
    except OSError:
        return ("missing", str(path))
    if not path.is_dir():
        return (str(path), top.st_size, top.st_ino, top.st_mtime_ns, top.st_ctime_ns)
    entries: list[object] = [str(path)]
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                info = os.stat(full)
            except OSError:
                continue
            entries.append((full, info.st_size, info.st_ino, info.st_mtime_ns,
                            info.st_ctime_ns))
    return tuple(entries)


def _count_files(path: Path, limit: int) -> int:
    count = 0
    for _, _, filenames in os.walk(path, followlinks=False):
        count += len(filenames)
        if count > limit:
            break
    return count


def _content_digest(path: Path) -> bytes:
    """sha256 over a file, or over a tree's relative names and contents."""
    digest = hashlib.sha256()
    if not path.exists():
        digest.update(b"missing")
        return digest.digest()
    if not path.is_dir():
        _hash_file(digest, path)
        return digest.digest()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            relative = str(full.relative_to(path)).encode()
            digest.update(b"%d:%s" % (len(relative), relative))
            _hash_file(digest, full)
    return digest.digest()


def _hash_file(digest: "hashlib._Hash", path: Path) -> None:
    try:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        digest.update(b"unreadable:%d" % exc.errno if exc.errno else b"unreadable")


@define
class _Remembered:
    signature: tuple[object, ...]
    digest: bytes


@define
class ContentDigests:
    """Content digests of server-side files and trees, recomputed only when
    their stat signature changes, checked at most once per ``recheck`` s."""

    recheck: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _remembered: dict[Path, _Remembered] = field(factory=dict)
    _checked: dict[Path, float] = field(factory=dict)

    def named_digest(self, path: Path) -> bytes:
        """A path a request or a server option names: checked on every
        request (such files are edited by hand, between two requests), and a
        directory with more than ``MAX_NAMED_FILES`` files raises
        ``Uncacheable``."""
        if path not in self._remembered and path.is_dir() \
                and _count_files(path, MAX_NAMED_FILES) > MAX_NAMED_FILES:
            raise Uncacheable(str(path))
        return self.digest(path, recheck=0.0)

    def digest(self, path: Path, recheck: float | None = None) -> bytes:
        now = self.clock()
        known = self._remembered.get(path)
        interval = self.recheck if recheck is None else recheck
        if known is not None and now - self._checked.get(path, -1e18) < interval:
            return known.digest
        signature = _stat_walk(path)
        if known is None or known.signature != signature:
            known = _Remembered(signature, _content_digest(path))
            self._remembered[path] = known
        self._checked[path] = now
        return known.digest


def relevant_environment(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted((name, value) for name, value in environ.items()
                  if name in _ENVIRONMENT_NAMES or name.startswith(_ENVIRONMENT_PREFIXES))


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

    def key(self, request: Job, release: str, options: Sequence[str],
            runtime: str | None, signers: Iterable[bytes] = (),
            build: Path | None = None, symbols: Path | None = None) -> str:
        """The hex key of a request about to be run with ``options``.

        ``signers`` are the certificates (DER or PEM bytes) whose keys sign
        this answer: the server's own for unprivileged requests, the MOK
        store's for Secure Boot clients.
        """
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
                digest.update(b"server-tapsets:" + self.digests.named_digest(Path(option[2:])))
        for name in request.named_paths:
            encoded = os.fsencode(name)
            digest.update(b"named:%d:%s" % (len(encoded), encoded))
            digest.update(self.digests.named_digest(Path(name)))
        for signer in signers:
            digest.update(b"signer:" + hashlib.sha256(signer).digest())
        return digest.hexdigest()
