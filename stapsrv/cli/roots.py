"""Making and removing the debootstrapped roots an administrator keeps in
a kernel store (toolchains, user-space roots): one way for both.

A root is made in ``PLACE/.partial-<name>-*/root`` (``debootstrap
--variant=minbase``, downloaded packages dropped), its ``manifest.json``
written beside it (every installed package's version and the root's
size), checked by the caller's loader, then renamed in place of the
older one, so a server never sees a half-made root.  Needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
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


def make_root(place: Path, name: str, suite: str, script: str, include: Sequence[str],
              mirror: str, out: TextIO, cache: Path | None,
              check: Callable[[Path], object]) -> Path:
    """debootstrap ``suite`` (with debootstrap's ``script``) as root
    ``name`` of ``place``, checked by ``check`` (which raises for a root
    that would not serve), in place of an older one; its directory."""
    place.mkdir(parents=True, exist_ok=True, mode=0o755)
    place.chmod(0o755)
    for leftover in [*place.glob(f".partial-{name}-*"), *place.glob(".removing-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # of an interrupted run
    work = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=place))
    try:
        work.chmod(0o755)
        started = time.monotonic()
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
        (work / MANIFEST).write_text(manifest_text(name, suite, time.time(),
                                                   installed(work / ROOT),
                                                   tree_size(work / ROOT)))
        check(work)
        target = place / name
        if target.exists():
            remove_root(place, name)
        os.rename(work, target)
        print(f"{name}: made in {time.monotonic() - started:.0f} s, "
              f"{megabytes(tree_size(target))} in {target}", file=out)
        return target
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def remove_root(place: Path, name: str) -> bool:
    """Remove root ``name`` of ``place`` (renamed away first, so it is gone
    at once); False when there is no such root (a link is not one)."""
    target = place / name
    if not target.is_dir() or target.is_symlink():
        return False
    old = Path(tempfile.mkdtemp(prefix=".removing-", dir=place))
    os.rename(target, old / "old")
    shutil.rmtree(old, ignore_errors=True)
    return True
