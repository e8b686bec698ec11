"""Making and removing the debootstrapped roots an administrator keeps in
a kernel store (toolchains, user-space roots): one way for both.

A root is made in ``PLACE/.partial-<name>-*/root`` (``debootstrap
--variant=minbase``, downloaded packages dropped), its ``manifest.json``
written beside it (every installed package's version and the root's
size), checked by the caller's loader, then renamed in place of the
older one, so a server never sees a half-made root.  Needs root.

The kernel store is the server user's: it could put a link or a
directory of its own where ``PLACE`` is, at any time.  So root works
only in a ``PLACE`` that is root's alone (not a link, owned by root,
writable by nobody else), through a descriptor of it opened once: every
path handed to a program goes through ``/proc/<pid>/fd/<n>``, which
names that very directory whatever is renamed around it.  Directories
the store still lacks are made as the owner of the nearest one that
exists (the server user's home: the store stays the server's).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from stapsrv.kernel.fetch import megabytes
from stapsrv.kernel.store import tree_size
from stapsrv.kernel.toolchains import MANIFEST, ROOT, manifest_text

MIRROR = "http://deb.debian.org/debian"
SCRIPTS = Path("/usr/share/debootstrap/scripts")


def installed(root: Path) -> dict[str, str]:
    """Every package installed in ``root``, with its version (dpkg-query)."""
    result = subprocess.run(
        ["dpkg-query", f"--admindir={root / 'var' / 'lib' / 'dpkg'}", "-W",
         "-f", "${Package}\t${Version}\t${db:Status-Status}\n"],
        capture_output=True, text=True, check=True)
    found = {}
    for line in result.stdout.splitlines():
        name, version, status = (line.split("\t") + ["", ""])[:3]
        if status == "installed":
            found[name] = version
    return found


class UnsafePlace(Exception):
    """Roots are not made or removed where the server user could swap
    things under root; the message says what to fix."""


def make_missing(directory: Path) -> None:
    """``directory`` and its missing parents, each owned like the nearest
    directory that exists (so a store made before the server's first start
    is still the server user's)."""
    missing = []
    nearest = directory
    while not os.path.lexists(nearest):
        missing.append(nearest)
        nearest = nearest.parent
    owner = os.lstat(nearest)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


@contextlib.contextmanager
def opened_place(place: Path, make: bool = True) -> Iterator[int]:
    """A descriptor of ``place`` (made, root's, if ``make`` and missing);
    raises :class:`UnsafePlace` unless it is a directory of root's alone."""
    if make:
        make_missing(place.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(place, 0o755)
    try:
        descriptor = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafePlace(f"{place} is not a plain directory ({exc.strerror}); remove it") from exc
    try:
        info = os.fstat(descriptor)
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise UnsafePlace(f"{place} is not root's alone (owner uid {info.st_uid}, mode "
                              f"{info.st_mode & 0o777:o}); remove it or make it root's, "
                              "mode 755")
        yield descriptor
    finally:
        os.close(descriptor)


def _through(descriptor: int) -> Path:
    """A path naming the directory ``descriptor`` is open on."""
    return Path(f"/proc/{os.getpid()}/fd/{descriptor}")


def make_root(place: Path, name: str, suite: str, script: str, include: Sequence[str],
              mirror: str, out: TextIO, cache: Path | None,
              check: Callable[[Path], object]) -> Path:
    """debootstrap ``suite`` (with debootstrap's ``script``) as root
    ``name`` of ``place``, checked by ``check`` (which raises for a root
    that would not serve), in place of an older one; its directory."""
    with opened_place(place) as descriptor:
        for entry in os.listdir(descriptor):
            if entry.startswith((f".partial-{name}-", ".removing-")):
                # Of an interrupted run.
                shutil.rmtree(entry, ignore_errors=True, dir_fd=descriptor)
        if os.path.islink(_through(descriptor) / name):
            raise UnsafePlace(f"{place / name} is a link; remove it")
        work_name = f".partial-{name}-{secrets.token_hex(4)}"
        os.mkdir(work_name, 0o755, dir_fd=descriptor)
        work = _through(descriptor) / work_name
        try:
            started = time.monotonic()
            _debootstrap(work, name, suite, script, include, mirror, out, cache)
            (work / MANIFEST).write_text(manifest_text(name, suite, time.time(),
                                                       installed(work / ROOT),
                                                       tree_size(work / ROOT)))
            check(work)
            _remove_in(descriptor, name)
            os.rename(work_name, name, src_dir_fd=descriptor, dst_dir_fd=descriptor)
        except BaseException:
            shutil.rmtree(work_name, ignore_errors=True, dir_fd=descriptor)
            raise
        print(f"{name}: made in {time.monotonic() - started:.0f} s, "
              f"{megabytes(tree_size(_through(descriptor) / name))} in {place / name}",
              file=out)
    return place / name


def _debootstrap(work: Path, name: str, suite: str, script: str, include: Sequence[str],
                 mirror: str, out: TextIO, cache: Path | None) -> None:
    argv = ["debootstrap", "--variant=minbase"]
    if include:
        argv.append(f"--include={','.join(include)}")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        argv.append(f"--cache-dir={cache}")
    argv += [suite, str(work / ROOT), mirror, str(SCRIPTS / script)]
    print(f"{name}: {' '.join(argv)}", file=out, flush=True)
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr)[-3000:]}")
    for leftover in (work / ROOT / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        leftover.unlink()


def remove_root(place: Path, name: str) -> bool:
    """Remove root ``name`` of ``place`` (renamed away first, so it is gone
    at once); False when there is no such root (a link is not one)."""
    if not os.path.isdir(place):
        return False
    with opened_place(place, make=False) as descriptor:
        return _remove_in(descriptor, name)


def _remove_in(descriptor: int, name: str) -> bool:
    """Remove ``name`` of the place open on ``descriptor``: False when it
    is not a directory there (absent, or a link)."""
    try:
        info = os.stat(name, dir_fd=descriptor, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    away = f".removing-{secrets.token_hex(4)}"
    os.rename(name, away, src_dir_fd=descriptor, dst_dir_fd=descriptor)
    shutil.rmtree(away, ignore_errors=True, dir_fd=descriptor)
    return True
