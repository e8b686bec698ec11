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

Blocking: run in the thread pool.  Server-side digests are content hashes
(so servers on different hosts with the same installation agree), kept
until a cheap stat walk shows a change; that walk runs at most once per
``recheck`` seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from attrs import define, field, frozen

from stapsrv.compile.archive import MEMBER_ERRORS, RequestRejected, check_request
from stapsrv.core.cmdline import Privilege, requested_privilege, scan_options

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
#: Where the translator's working directory is, as far as relative paths in
#: arguments go: ``<TMPDIR>/<scratch>/request``.
_NOTIONAL_REQUEST = "/<tmpdir>/<scratch>/request"
_PATH_LITERAL = re.compile(rb'"(/[^"\n]{0,4096})"')


class Uncacheable(Exception):
    """The request names server files that cannot be fingerprinted."""


@frozen
class RequestSummary:
    """What the key needs to know from a request archive."""

    digest: bytes
    release: str | None
    privilege: Privilege
    wants_mok: bool
    #: Server paths the request names (absolute, normalised); relative ones
    #: are given relative to the notional request directory.
    named_paths: tuple[str, ...] = ()


def _server_path(word: str) -> str | None:
    """The server path ``word`` names when used by the translator, or None
    when it is not a path or stays inside the request."""
    if "/" not in word or "\0" in word:
        return None
    path = os.path.normpath(os.path.join(_NOTIONAL_REQUEST, word))
    if path == "/<tmpdir>/<scratch>" or path.startswith("/<tmpdir>/<scratch>/"):
        return None
    return path


def named_paths(arguments: Sequence[str], scripts: Iterable[bytes]) -> tuple[str, ...]:
    """Server paths that the arguments or script texts may make the
    translator read.  Generous on purpose: a word that merely looks like a
    path only adds a fingerprint to the key."""
    words: list[str] = []
    used: set[int] = set()
    texts = list(scripts)
    for option in scan_options(arguments):
        used.update(range(option.start, option.stop))
        if option.value is None:
            continue
        if option.name == "e":
            texts.append(os.fsencode(option.value))
        else:
            words.append(option.value)
            words.append(option.value.partition("=")[2])
    words += [word for index, word in enumerate(arguments) if index not in used]
    for text in texts:
        words += [os.fsdecode(match) for match in _PATH_LITERAL.findall(text)]
    found = {path for word in words if (path := _server_path(word)) is not None}
    return tuple(sorted(found))


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    with archive.open(info) as source:
        data = source.read(budget + 1)
    if len(data) > budget:
        raise RequestRejected("Uncompressed request data exceeds the declared sizes")
    return data


def summarize_request(body: bytes, max_size: int) -> RequestSummary:
    """Digest a request archive in memory.  Raises ``RequestRejected`` for
    exactly the archives that ``extract_request`` refuses (so those go down
    the normal path and get its answer)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise RequestRejected(f"Unable to extract client request ({exc})") from exc
    files: dict[tuple[str, ...], bytes] = {}
    directories: set[tuple[str, ...]] = set()
    with archive:
        members = check_request(archive, max_size)
        budget = max_size
        for info in members:
            parts = tuple(p for p in info.filename.split("/") if p not in ("", "."))
            if info.is_dir():
                directories.add(parts)
                continue
            try:
                data = _member_bytes(archive, info, budget)
            except MEMBER_ERRORS as exc:
                raise RequestRejected(f"Unable to extract client request ({exc})") from exc
            budget -= len(data)
            files[parts] = data
    digest = hashlib.sha256()
    for parts in sorted(directories | set(files)):
        name = "/".join(parts).encode()
        if parts in files:
            data = files[parts]
            digest.update(b"f%d:%s%d:" % (len(name), name, len(data)) + data)
        else:
            digest.update(b"d%d:%s" % (len(name), name))
    sysinfo = files.get(("sysinfo",), b"").decode("utf-8", "replace").split()
    arguments = []
    index = 1
    while ("argv%d" % index,) in files:
        raw = files[("argv%d" % index,)].split(b"\0", 1)[0]
        arguments.append(os.fsdecode(raw))
        index += 1
    moks = files.get(("mok_fingerprints",), b"").strip()
    scripts = [data for parts, data in files.items() if parts[0] in ("script", "tapset")]
    return RequestSummary(
        digest=digest.digest(),
        release=sysinfo[1] if len(sysinfo) >= 2 else None,
        privilege=requested_privilege(arguments).privilege,
        wants_mok=bool(moks),
        named_paths=named_paths(arguments, scripts),
    )


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

    def server_paths(self, runtime: str | None, release: str) -> list[tuple[str, Path]]:
        stap = Path(self.stap)
        share = stap.resolve().parent.parent / "share" / "systemtap"
        compiler = shutil.which("gcc", path=self.environ.get("PATH")) or "/usr/bin/gcc"
        build = self.modules_root / release / "build"
        paths = [("stap", stap), ("tapsets", share / "tapset"),
                 ("runtime", Path(runtime) if runtime else share / "runtime"),
                 ("compiler", Path(compiler).resolve()), ("rc", self.rc_file)]
        paths += [("build:" + name, build / name) for name in BUILD_TREE_FILES]
        return paths

    def key(self, request: RequestSummary, release: str, options: Sequence[str],
            runtime: str | None, signers: Iterable[bytes] = ()) -> str:
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
        for label, path in self.server_paths(runtime, release):
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


def needs_signature(request: RequestSummary) -> bool:
    return request.privilege in (Privilege.STAPUSR, Privilege.STAPSYS)
