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
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from attrs import frozen

from stapsrv.cli.roots import MIRROR, UnsafePlace, make_root, remove_root
from stapsrv.kernel.toolchains import (
    HOST,
    MANIFEST,
    DamagedToolchain,
    discover,
    installed_packages,
    load,
    toolchains_directory,
    valid_name,
)

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
#: (bookworm's kernels) to gcc-16 (its default), and gcc-12 and gcc-14 for
#: arm64 (``aarch64-linux-gnu-gcc-12`` and ``-14``, which bookworm's and
#: trixie's arm64 headers call).
SUITES = {
    "forky": Suite("forky", "sid", ("gcc-12", "gcc-14"),
                   ("gcc-12-aarch64-linux-gnu", "gcc-14-aarch64-linux-gnu")),
}


def store_of(arguments: argparse.Namespace) -> Path:
    if arguments.store:
        return Path(arguments.store).absolute()
    try:
        home = pwd.getpwnam(arguments.user).pw_dir
    except KeyError:
        raise SystemExit(f"No user {arguments.user}: name the store with --store DIR")
    return Path(home) / ".cache" / "stapsrv" / "kernels"


def make_toolchain(store: Path, suite: Suite, mirror: str, out: TextIO,
                   cache: Path | None = None) -> Path:
    """debootstrap ``suite`` into a new directory of ``store``'s toolchains
    and put it in place (replacing an older one); its directory."""
    return make_root(toolchains_directory(store), suite.name, suite.name, suite.script,
                     suite.packages, mirror, out, cache, load)


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
    return valid_name(name) and remove_root(toolchains_directory(store), name)


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
        try:
            if remove_toolchain(store, arguments.name):
                return 0
        except UnsafePlace as exc:
            print(exc, file=sys.stderr)
            return 1
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
    except (RuntimeError, DamagedToolchain, OSError, subprocess.CalledProcessError,
            UnsafePlace) as exc:
        print(f"{suite.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
