"""``python -m stapsrv.cli.sysroots [--store DIR | --user USER] list |
create SUITE [--include PACKAGES] | update NAME | remove NAME``: the
user-space roots of a server's kernel store (:mod:`stapsrv.kernel.sysroots`).

A user-space root is another distribution's base system, made with
``debootstrap --variant=minbase`` (plus the packages ``--include`` names),
against whose files a toolchain's translator resolves the user-space probes
of that distribution's clients (``--sysroot``).  It is kept at
``STORE/.sysroots/<name>/root`` with ``manifest.json`` (the suite, when it
was made, every package's version) beside it; ``<name>`` is the
distribution (``trixie`` for ``trixie``).  ``create``, ``update`` and
``remove`` need root; the server only reads the root, and takes up what
the store holds when it starts.  Nothing here changes the host's apt
sources.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from stapsrv.cli.roots import MIRROR, make_root, remove_root
from stapsrv.cli.toolchains import store_of
from stapsrv.kernel.sysroots import (
    DamagedRoot,
    discover_roots,
    distribution,
    load_root,
    sysroots_directory,
)
from stapsrv.kernel.toolchains import MANIFEST

#: Suites ``create`` knows, with debootstrap's script for each (bookworm's
#: debootstrap knows forky only as sid).
SUITES = {"trixie": "trixie", "forky": "sid"}


def make_sysroot(store: Path, suite: str, include: list[str], mirror: str, out: TextIO,
                 cache: Path | None = None) -> Path:
    """debootstrap ``suite`` into a new directory of ``store``'s user-space
    roots and put it in place of an older one; its directory."""
    return make_root(sysroots_directory(store), distribution(suite), suite, SUITES[suite],
                     include, mirror, out, cache, load_root)


def list_roots(store: Path, out: TextIO, packages: bool = False) -> int:
    """One line per root (the host's first); 1 when one is damaged."""
    found, damaged = discover_roots(store)
    print("host\tthe server's own files, for its own distribution's clients", file=out)
    for root in found:
        versions = dict(root.packages)
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(
            (root.root.parent / MANIFEST).stat().st_mtime))
        print(f"{root.name}\tlibc6 {versions.get('libc6', '?')}\t{len(versions)} packages\t"
              f"suite {root.suite}, made {made}, manifest {root.digest}", file=out)
        if packages:
            for name, version in root.packages:
                print(f"  {name}={version}", file=out)
    for line in damaged:
        print(f"DAMAGED {line}", file=out)
    return 1 if damaged else 0


def remove_sysroot(store: Path, name: str) -> bool:
    return name in SUITES and remove_root(sysroots_directory(store), name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stapsrv.cli.sysroots",
                                     description="The user-space roots of stapsrv.")
    parser.add_argument("--store", help="the kernel store's directory (the server's "
                        "--kernel-store)")
    parser.add_argument("--user", default="stap-server",
                        help="else the store of this user (default stap-server)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the user-space roots")
    listing.add_argument("--packages", action="store_true", help="every package's version")
    for command, text in (("create", "make a root from a Debian suite (root)"),
                          ("update", "make it again from the suite's current packages "
                           "(root)")):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("suite", choices=sorted(SUITES))
        sub.add_argument("--include", default="",
                         help="more packages, comma-separated (the programs and "
                         "libraries your clients probe)")
        sub.add_argument("--mirror", default=MIRROR)
        sub.add_argument("--cache-dir", help="debootstrap's package cache (kept)")
    remove = commands.add_parser("remove", help="remove a root (root)")
    remove.add_argument("name")
    return parser


def main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    store = store_of(arguments)
    if arguments.command == "list":
        return list_roots(store, sys.stdout, arguments.packages)
    if os.geteuid() != 0:
        print(f"{arguments.command} needs root (debootstrap does; the server only reads "
              "the root).", file=sys.stderr)
        return 1
    if arguments.command == "remove":
        if remove_sysroot(store, arguments.name):
            return 0
        print(f"No root {arguments.name} in {sysroots_directory(store)}", file=sys.stderr)
        return 1
    name = distribution(arguments.suite)
    if arguments.command == "create" and (sysroots_directory(store) / name).exists():
        print(f"Root {name} exists; 'update {name}' makes it again", file=sys.stderr)
        return 1
    include = [word for word in arguments.include.split(",") if word]
    try:
        make_sysroot(store, arguments.suite, include, arguments.mirror, sys.stdout,
                  Path(arguments.cache_dir).absolute() if arguments.cache_dir else None)
    except (RuntimeError, DamagedRoot, OSError, subprocess.CalledProcessError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
