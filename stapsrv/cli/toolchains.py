"""``python -m stapsrv.cli.toolchains [--store DIR | --user USER] list |
create SUITE | update NAME | remove NAME``: the toolchains of a server's
kernel store (:mod:`stapsrv.kernel.toolchains`).

``create`` makes a root from a Debian suite with ``debootstrap`` (minbase,
with the suite's ``systemtap`` and compilers) at
``STORE/.toolchains/<suite>/root`` and records every package's version in
``manifest.json`` beside it; ``update`` makes it again from the suite's
current packages and puts it in place of the old one; ``remove`` removes
it.  Those three need root (debootstrap does); the server, unprivileged,
only reads the root, and takes up what the store holds when it starts.
``list`` shows each toolchain, its translator and compilers (``--packages``:
every package), and says what is wrong with a damaged one.

The store is ``--store DIR`` (the server's ``--kernel-store``), else that
of ``--user`` (default ``stap-server``): ``~USER/.cache/stapsrv/kernels``.
Nothing here changes the host's apt sources.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from attrs import frozen

from stapsrv.kernel.fetch import megabytes
from stapsrv.kernel.store import tree_size
from stapsrv.kernel.toolchains import (
    HOST,
    MANIFEST,
    ROOT,
    DamagedToolchain,
    discover,
    installed_packages,
    load,
    manifest_text,
    toolchains_directory,
    valid_name,
)

MIRROR = "http://deb.debian.org/debian"
SCRIPTS = Path("/usr/share/debootstrap/scripts")
#: What every toolchain root has besides the suite's translator: make and
#: the C library's headers for pass 4.
_COMMON = ("systemtap", "make", "libc6-dev", "gcc")


@frozen
class Suite:
    """A Debian suite a toolchain can be made from."""

    name: str
    #: debootstrap's script for it (bookworm's knows forky only as sid).
    script: str
    #: The compilers beside the suite's default gcc: those its kernels' and
    #: older Debian kernels' headers call.
    compilers: tuple[str, ...]
    #: Cross compilers (with their binutils) for the other architectures a
    #: server may build for (``--fetch-architectures``): the version the
    #: kernels' headers call, with ``CROSS_COMPILE``'s prefix.
    cross: tuple[str, ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return (*_COMMON, *self.compilers, *self.cross)


#: Suites known to ``create``: forky (testing) has SystemTap 5.6 and gcc-12
#: (bookworm's kernels) to gcc-16 (its default), and gcc-12 for arm64
#: (``aarch64-linux-gnu-gcc-12``, which bookworm's arm64 headers call).
SUITES = {
    "forky": Suite("forky", "sid", ("gcc-12", "gcc-14"), ("gcc-12-aarch64-linux-gnu",)),
}


def store_of(arguments: argparse.Namespace) -> Path:
    if arguments.store:
        return Path(arguments.store).absolute()
    try:
        home = pwd.getpwnam(arguments.user).pw_dir
    except KeyError:
        raise SystemExit(f"No user {arguments.user}: name the store with --store DIR")
    return Path(home) / ".cache" / "stapsrv" / "kernels"


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


def make_toolchain(store: Path, suite: Suite, mirror: str, out: TextIO,
                   cache: Path | None = None) -> Path:
    """debootstrap ``suite`` into a new directory of ``store``'s toolchains
    and put it in place (replacing an older one); its directory."""
    place = toolchains_directory(store)
    place.mkdir(parents=True, exist_ok=True, mode=0o755)
    place.chmod(0o755)
    for leftover in [*place.glob(f".partial-{suite.name}-*"), *place.glob(".removing-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # of an interrupted run
    work = Path(tempfile.mkdtemp(prefix=f".partial-{suite.name}-", dir=place))
    try:
        work.chmod(0o755)
        started = time.monotonic()
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(suite.packages)}"]
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            argv.append(f"--cache-dir={cache}")
        argv += [suite.name, str(work / ROOT), mirror, str(SCRIPTS / suite.script)]
        print(f"{suite.name}: {' '.join(argv)}", file=out, flush=True)
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-3000:]}")
        for leftover in (work / ROOT / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            leftover.unlink()
        (work / MANIFEST).write_text(manifest_text(suite.name, suite.name, time.time(),
                                                   installed(work / ROOT)))
        load(work)  # refuses a root that would not serve
        target = place / suite.name
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".removing-", dir=place))
            os.rename(target, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(work, target)
        print(f"{suite.name}: made in {time.monotonic() - started:.0f} s, "
              f"{megabytes(tree_size(target))} in {target}", file=out)
        return target
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def list_toolchains(store: Path, out: TextIO, packages: bool = False) -> int:
    """One line per toolchain (the host's first); 1 when one is damaged."""
    found, damaged = discover(store)
    print(f"{HOST}\tSystemTap {_host_version()}\t/usr/bin/stap and the host's compilers",
          file=out)
    for toolchain in found:
        versions = dict(toolchain.packages)
        compilers = ", ".join(f"{name} {version}" for name, version in sorted(versions.items())
                              if name == "gcc" or name.startswith("gcc-")
                              and name[4:].isdigit())
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(
            (toolchain.root.parent / MANIFEST).stat().st_mtime))
        print(f"{toolchain.name}\tSystemTap {versions.get('systemtap', '?')}\t{compilers}\t"
              f"suite {toolchain.suite}, made {made}, manifest {toolchain.digest}", file=out)
        if packages:
            for name, version in toolchain.packages:
                print(f"  {name}={version}", file=out)
    for line in damaged:
        print(f"DAMAGED {line}", file=out)
    return 1 if damaged else 0


def _host_version() -> str:
    return installed_packages(Path("/var/lib/dpkg")).get("systemtap", "not installed")


def remove_toolchain(store: Path, name: str) -> bool:
    target = toolchains_directory(store) / name
    if not valid_name(name) or not target.is_dir() or target.is_symlink():
        return False
    old = Path(tempfile.mkdtemp(prefix=".removing-", dir=target.parent))
    os.rename(target, old / "old")
    shutil.rmtree(old, ignore_errors=True)
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stapsrv.cli.toolchains",
                                     description="The toolchains of stapsrv.")
    parser.add_argument("--store", help="the kernel store's directory (the server's "
                        "--kernel-store)")
    parser.add_argument("--user", default="stap-server",
                        help="else the store of this user (default stap-server)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the toolchains, the host's first")
    listing.add_argument("--packages", action="store_true", help="every package's version")
    for command, text in (("create", "make a toolchain from a Debian suite (root)"),
                          ("update", "make it again from the suite's current packages "
                           "(root)")):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("suite", choices=sorted(SUITES))
        sub.add_argument("--mirror", default=MIRROR)
        sub.add_argument("--cache-dir", help="debootstrap's package cache (kept)")
    remove = commands.add_parser("remove", help="remove a toolchain (root)")
    remove.add_argument("name")
    return parser


def main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    store = store_of(arguments)
    if arguments.command == "list":
        return list_toolchains(store, sys.stdout, arguments.packages)
    if os.geteuid() != 0:
        print(f"{arguments.command} needs root (debootstrap does; the server only reads "
              "the root).", file=sys.stderr)
        return 1
    if arguments.command == "remove":
        if remove_toolchain(store, arguments.name):
            return 0
        print(f"No toolchain {arguments.name} in {toolchains_directory(store)}",
              file=sys.stderr)
        return 1
    suite = SUITES[arguments.suite]
    exists = (toolchains_directory(store) / suite.name).exists()
    if arguments.command == "create" and exists:
        print(f"Toolchain {suite.name} exists; 'update {suite.name}' makes it again",
              file=sys.stderr)
        return 1
    try:
        make_toolchain(store, suite, arguments.mirror, sys.stdout,
                       Path(arguments.cache_dir).absolute() if arguments.cache_dir else None)
    except (RuntimeError, DamagedToolchain, OSError, subprocess.CalledProcessError) as exc:
        print(f"{suite.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
