"""``python -m stapsrv.cli.kernels [--store DIR] [--size MIB] list |
prefetch RELEASE... | remove RELEASE...``: the kernel store of the user who
runs it (run it as the server's user; ``--store`` names another store, as
the server's ``--kernel-store`` does).

``prefetch`` fetches releases the way a request does (apt's candidate
packages, verified by apt, unpacked without root), whatever the server's
fetch policy, and shows the download's progress; the size cap given with
``--size`` (default: the server's default) is applied afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.threadpool import ThreadPool

from stapsrv.compile.fetch import FetchFailed, KernelFetcher, megabytes
from stapsrv.compile.kernels import KernelStore, store_directory
from stapsrv.config.values import DEFAULT_KERNEL_STORE_SIZE, ServerConfig
from stapsrv.paths import RootRefused, refuse_root
from stapsrv.reactor import IServerReactor


def _store(arguments: argparse.Namespace) -> KernelStore:
    config = ServerConfig(releases=(), ssl_dir=Path("/"),
                          kernel_store=Path(arguments.store).absolute()
                          if arguments.store else None)
    return KernelStore(store_directory(config), arguments.size << 20)


def list_store(store: KernelStore, out: TextIO) -> None:
    releases = store.releases()
    total = sum(entry.size for entry in releases)
    print(f"Kernel store {store.directory}: {len(releases)} releases, {megabytes(total)} "
          f"of {megabytes(store.size_cap)}", file=out)
    for entry in releases:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.used))
        symbols = "System.map" if entry.system_map is not None else "no System.map"
        print(f"{entry.release}\t{megabytes(entry.size)}\tused {used}\t{symbols}\t"
              + " ".join(f"{p.name}={p.version}" for p in entry.packages), file=out)


class ProgressLine:
    """One line per release, rewritten in place on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last = ""

    def __call__(self, release: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        line = f"{release}: {megabytes(done)} of {megabytes(total)} ({percent}%)"
        if line == self.last:
            return
        self.last = line
        if self.out.isatty():
            self.out.write("\r" + line)
        elif percent in (0, 100) or percent // 10 != getattr(self, "decile", -1):
            self.out.write(line + "\n")
        self.decile = percent // 10
        self.out.flush()

    def end(self) -> None:
        if self.out.isatty() and self.last:
            self.out.write("\n")
            self.out.flush()
        self.last = ""


async def prefetch(reactor: IServerReactor, store: KernelStore,
                   releases: Sequence[str], out: TextIO) -> int:
    store.open()
    pool = ThreadPool(minthreads=0, maxthreads=2, name="stapsrv-kernels")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    fetcher = KernelFetcher(store, reactor, pool, ("*",), log=Logger(namespace="stapsrv"))
    failed = 0
    for release in releases:
        progress = ProgressLine(out)
        try:
            stored = await fetcher.ensure(release, progress)
        except FetchFailed as exc:
            progress.end()
            print(f"{release}: {exc}", file=sys.stderr)
            failed += 1
            continue
        progress.end()
        print(f"{release}: stored, {megabytes(stored.size)} in {stored.directory}", file=out)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stapsrv.cli.kernels",
                                     description="The kernel store of stapsrv.")
    parser.add_argument("--store", help="the store's directory (default: the server's, "
                        "~/.cache/stapsrv/kernels of this user)")
    parser.add_argument("--size", type=int, default=DEFAULT_KERNEL_STORE_SIZE >> 20,
                        help="size cap in MiB applied after a prefetch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the stored releases, most recently used first")
    fetch = commands.add_parser("prefetch", help="fetch releases now")
    fetch.add_argument("releases", nargs="+", metavar="RELEASE")
    remove = commands.add_parser("remove", help="remove stored releases")
    remove.add_argument("releases", nargs="+", metavar="RELEASE")
    return parser


def main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    try:
        refuse_root()
    except RootRefused:
        print("Run this as the server's user (e.g. runuser -u stap-server -- python3 -m "
              "stapsrv.cli.kernels ...): the store is that user's.", file=sys.stderr)
        return 1
    store = _store(arguments)
    if arguments.command == "list":
        list_store(store, sys.stdout)
        return 0
    if arguments.command == "remove":
        status = 0
        for release in arguments.releases:
            if not store.remove(release):
                print(f"No release {release} in {store.directory}", file=sys.stderr)
                status = 1
        return status
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    codes: list[int] = []

    async def run(reactor: IServerReactor) -> None:
        codes.append(await prefetch(reactor, store, arguments.releases, sys.stdout))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code)
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
