"""``python -m stapsrv.cli.kernels [--store DIR] [--size MIB] list |
prefetch RELEASE... | remove RELEASE...``: the kernel store of the user who
runs it (run it as the server's user; ``--store`` names another store, as
the server's ``--kernel-store`` does).

``prefetch`` fetches releases the way a request does (apt's candidate
packages, verified by apt, unpacked without root), with the System.map
made from the kernel image (``--no-symbols``: not) and, with
``--debuginfo``, the vmlinux of the -dbg package, whatever the server's
fetch policy, and shows the downloads' progress; with ``--suites`` (as the
server's ``--fetch-suites``) through the store's private apt configuration
for those suites, its lists updated first when older than the server's
interval; the size cap given with
``--size`` (default: the server's default) is applied afterwards.
``remove`` removes a release's tree and symbols, or the symbols the
server made for an installed release.

``run RELEASE MODULE.ko`` boots the release's kernel image in a VM (qemu;
the image fetched into the store when the machine has none) and loads the
module there with a client's own ``staprun`` (``--staprun``: ``host``,
the default, a prefix such as ``/opt/stap55``, or a root directory
holding another distribution's SystemTap); it prints what the module
printed and exits with ``staprun``'s status.

``verify RELEASE --server HOST:PORT`` proves a release before machines
boot into it: each client (the machine's ``stap``, and ``--client PREFIX``
for one installed under a prefix) compiles a small set of probe kinds
through the server, and each module is run in the VM with that client's
own ``staprun``.  The result (per client and probe kind: runs or the
failure; when; the translator) is kept with the release in the store and
shown by ``list``, ``stap-server status --json`` and the server's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.threadpool import ThreadPool

from stapsrv.config.values import DEFAULT_KERNEL_STORE_SIZE, ServerConfig
from stapsrv.core.aptsources import SuiteError, parse_suites
from stapsrv.core.architectures import release_architecture
from stapsrv.kernel import prepared
from stapsrv.kernel.fetch import (
    FetchFailed,
    KernelFetcher,
    debian_architecture,
    debug_files,
    megabytes,
)
from stapsrv.kernel.privateapt import (
    APT_DIRECTORY,
    AptSetupError,
    ListsUpdater,
    PrivateApt,
    foreign_apts,
)
from stapsrv.kernel.store import (
    DEBUG_DIRECTORY,
    InUse,
    KernelStore,
    StoredRelease,
    store_directory,
)
from stapsrv.kernel.toolchains import family
from stapsrv.paths import RootRefused, refuse_root
from stapsrv.reactor import IServerReactor
from stapsrv.vm import verification
from stapsrv.vm.console import Outcome
from stapsrv.vm.initramfs import BUSYBOX, Job, MissingFile, Staprun
from stapsrv.vm.userland import ensure_userland
from stapsrv.vm.runner import VmRunner, VmSettings
from stapsrv.vm.verification import Verification
from stapsrv.vm.verify import ClientSpec, Verifier, version_of


def _store(arguments: argparse.Namespace) -> KernelStore:
    config = ServerConfig(releases=(), ssl_dir=Path("/"),
                          kernel_store=Path(arguments.store).absolute()
                          if arguments.store else None)
    return KernelStore(store_directory(config), arguments.size << 20)


def debug_store(store: KernelStore) -> KernelStore:
    """Where the symbols and debuginfo of the releases are."""
    return store.part(DEBUG_DIRECTORY)


def _symbols(entry: StoredRelease | None) -> str:
    if entry is None:
        return "no System.map"
    files = debug_files(entry)
    return "System.map, vmlinux" if files.vmlinux is not None else "System.map"


def list_store(store: KernelStore, out: TextIO) -> None:
    releases = store.releases()
    debug = {entry.release: entry for entry in debug_store(store).releases()}
    total, roots = store.total_size(), store.admin_bytes()
    print(f"Kernel store {store.directory}: {len(releases)} releases, {megabytes(total)} "
          f"of {megabytes(store.size_cap)}"
          + (f" (toolchains and user-space roots: {megabytes(roots)})" if roots else ""),
          file=out)
    if roots * 2 > store.size_cap:
        print("Warning: the roots take over half of --kernel-store-size; releases are "
              "removed to make room at every fetch: raise it", file=out)
    for entry in releases:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.used))
        print(f"{entry.release}\t{megabytes(entry.size)}\tused {used}\t"
              f"{_symbols(debug.get(entry.release))}\t"
              + " ".join(f"{p.name}={p.version}" for p in entry.packages)
              + (f"\tfrom {entry.suite}" if entry.suite else ""), file=out)
    stored = {entry.release for entry in releases}
    for release, entry in sorted(debug.items()):
        if release not in stored:
            print(f"{release}\t{megabytes(entry.size)}\tinstalled tree\t{_symbols(entry)}",
                  file=out)
    for found in verification.load_all(store.directory):
        print_verification(found, out)
    for record in prepared.load_all(store.directory):
        print(f"{record.release}\tprepared: {record.summary()}", file=out)


def print_verification(found: Verification, out: TextIO) -> None:
    """One line for the release, one per probe that does not run."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(found.when))
    verdict = "verified" if found.passed else "FAILED verification"
    print(f"{found.release}\t{verdict} {when}\t{found.summary()}\tby {found.translator}",
          file=out)
    for result in found.results:
        if not result.runs:
            print(f"  {result.client} {result.probe}: {result.failure}", file=out)


def remove_release(store: KernelStore, release: str) -> bool:
    """Remove a release's tree, its symbols, its module debuginfo and its
    image; whether there was any.  Raises :class:`InUse` (nothing removed)
    while a compile reads it."""
    removed = store.remove_everywhere(release)
    verified = verification.remove(store.directory, release)
    return removed or verified


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
                   releases: Sequence[str], out: TextIO, symbols: bool = True,
                   debuginfo: bool = False, apt: PrivateApt | None = None) -> int:
    fetcher = _fetcher(reactor, store, apt, releases)
    failed = 0
    for release in releases:
        progress = ProgressLine(out)
        try:
            stored = await fetcher.ensure(release, progress)
            progress.end()
            print(f"{release}: stored, {megabytes(stored.size)} in {stored.directory}",
                  file=out)
            if symbols or debuginfo:
                files = await fetcher.ensure_debug(release, debuginfo, progress)
                progress.end()
                kept = "System.map and vmlinux" if files.vmlinux is not None else "System.map"
                print(f"{release}: {kept} in {files.system_map.parent}", file=out)
        except FetchFailed as exc:
            progress.end()
            print(f"{release}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _fetcher(reactor: IServerReactor, store: KernelStore,
             apt: PrivateApt | None = None, releases: Sequence[str] = ()) -> KernelFetcher:
    """A fetcher of any release (the server's policy is not the admin's),
    through the suites' private apt configuration when ``apt`` is given
    (its lists updated first when older than the server's interval); for
    other architectures' ``releases``, through each one's own
    private apt too (the same suites, or the machine's own)."""
    store.open()
    pool = ThreadPool(minthreads=0, maxthreads=2, name="stapsrv-kernels")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    log = Logger(namespace="stapsrv")
    host = debian_architecture()
    others = {arch for release in releases
              if (arch := release_architecture(release)) not in (None, host)}
    foreign = foreign_apts(store.directory, apt.suites if apt is not None else (),
                           sorted(str(arch) for arch in others))
    fetcher = KernelFetcher(store, reactor, pool, ("*",), log=log, apt=apt, foreign=foreign)
    updaters = [ListsUpdater(each, fetcher.run, reactor, lambda packages: None, log=log)
                for each in [*([apt] if apt is not None else []), *foreign.values()]]
    if updaters:
        async def ready() -> None:
            for lists in updaters:
                await lists.first_update()
        fetcher.ready = ready
        for lists in updaters:
            lists.start_if_stale(time.time())
    return fetcher


def private_apt(store: KernelStore, suites: Sequence[str]) -> PrivateApt | None:
    """The store's private apt configuration for ``--suites`` (None: none
    named), written.  Raises SuiteError, AptSetupError."""
    named = parse_suites(suites)
    if not named:
        return None
    apt = PrivateApt(store.directory / APT_DIRECTORY, named, debian_architecture())
    apt.prepare()
    return apt


async def run_module(reactor: IServerReactor, store: KernelStore, release: str,
                     staprun: Staprun, job: Job, settings: VmSettings,
                     apt: PrivateApt | None = None) -> Outcome:
    """``job`` on ``release``'s kernel, booted in a VM.  Raises FetchFailed
    or MissingFile."""
    fetcher = _fetcher(reactor, store, apt, [release])
    kernel = await fetcher.ensure_image(release, ProgressLine(sys.stderr))
    busybox = BUSYBOX
    if fetcher.via(release) == "arm64":
        # Debian's arm64 staprun of the named client's family (the machine's
        # own 4.8, or a client under a prefix), unless a root is named.
        root = await ensure_userland(fetcher, "arm64")
        if staprun.root == Path("/"):
            wanted = await client_family(fetcher, staprun)
            staprun = Staprun.in_root(await ensure_userland(fetcher, "arm64", wanted))
        busybox = str(root / "bin" / "busybox")
        settings = settings.for_arm64()
    return await VmRunner(reactor, settings).run(kernel, staprun, job, fetcher.in_thread,
                                                 busybox=busybox)


async def client_family(fetcher: KernelFetcher, staprun: Staprun) -> int:
    """The transport family of the client whose ``stap`` is beside
    ``staprun`` (``stap -V``; 4 when it cannot be read)."""
    stap = str(Path(staprun.staprun).parent / "stap")
    out, err, code = await fetcher.run([stap, "-V"])
    return family(version_of((out + err).decode(errors="replace")) if code == 0 else "")


async def verify_release(reactor: IServerReactor, store: KernelStore, release: str,
                         server: str, clients: Sequence[ClientSpec], settings: VmSettings,
                         work: Path, apt: PrivateApt | None = None) -> Verification:
    """Verify ``release`` and keep the result in the store.  Raises
    FetchFailed."""
    fetcher = _fetcher(reactor, store, apt, [release])
    verifier = Verifier(reactor, fetcher, VmRunner(reactor, settings), server, work)
    found = await verifier.verify(release, clients)
    await fetcher.in_thread(verification.save, store.directory, found)
    return found


def _verify_command(arguments: argparse.Namespace, store: KernelStore) -> int:
    clients = ([] if arguments.no_host_client else [ClientSpec.host()]) + [
        ClientSpec.prefix(prefix) for prefix in arguments.client]
    settings = VmSettings(timeout=arguments.timeout, kvm=not arguments.no_kvm)

    async def run(reactor: IServerReactor) -> Verification:
        with tempfile.TemporaryDirectory(prefix="stapsrv-verify-") as work:
            return await verify_release(reactor, store, arguments.release, arguments.server,
                                        clients, settings, Path(work), arguments.apt)

    found = _react_once(run, arguments.release)
    if isinstance(found, int):
        return found
    if arguments.json:
        json.dump(found.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for result in found.results:
            print(f"{found.release}\t{result.client}\t{result.probe}\t"
                  f"{'runs' if result.runs else 'FAILS: ' + result.failure}")
        print_verification(found, sys.stdout)
    return 0 if found.passed else 1


T = TypeVar("T")


def _react_once(work: Callable[[IServerReactor], Coroutine[Any, Any, T]], release: str) -> T | int:
    """``work``'s result, run under a reactor of its own; or the exit code
    when it failed (FetchFailed, MissingFile: one line on stderr, 2)."""
    results: list[T] = []
    problems: list[str] = []

    async def run(reactor: IServerReactor) -> None:
        try:
            results.append(await work(reactor))
        except (FetchFailed, MissingFile) as exc:
            problems.append(str(exc))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code)
    if problems or not results:
        print(f"{release}: {problems[0] if problems else 'no result'}", file=sys.stderr)
        return 2
    return results[0]


def outcome_json(outcome: Outcome) -> dict[str, object]:
    return {"booted": outcome.booted, "output": outcome.output, "errors": outcome.errors,
            "status": outcome.status, "timed_out": outcome.timed_out,
            "accelerator": outcome.accelerator, "summary": outcome.summary(),
            "console": outcome.console}


def _run_command(arguments: argparse.Namespace, store: KernelStore) -> int:
    try:
        staprun = Staprun.named(arguments.staprun)
    except MissingFile as exc:
        print(exc, file=sys.stderr)
        return 2
    if arguments.staprun_program:
        staprun = attrs.evolve(staprun, program=Path(arguments.staprun_program).absolute())
    job = Job(Path(arguments.module).absolute(), tuple(arguments.option),
              arguments.target, arguments.group,
              Path(arguments.signers).absolute() if arguments.signers else None,
              tuple(arguments.file), arguments.seconds)
    settings = VmSettings(timeout=arguments.timeout, kvm=not arguments.no_kvm)

    async def run(reactor: IServerReactor) -> Outcome:
        return await run_module(reactor, store, arguments.release, staprun, job, settings,
                                arguments.apt)

    outcome = _react_once(run, arguments.release)
    if isinstance(outcome, int):
        return outcome
    if arguments.json:
        json.dump(outcome_json(outcome), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(outcome.output)
        sys.stderr.write(outcome.errors)
        if outcome.status != 0:
            print(f"{arguments.release}: {outcome.summary()}", file=sys.stderr)
    return outcome.status if outcome.status is not None else 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stapsrv.cli.kernels",
                                     description="The kernel store of stapsrv.")
    parser.add_argument("--store", help="the store's directory (default: the server's, "
                        "~/.cache/stapsrv/kernels of this user)")
    parser.add_argument("--size", type=int, default=DEFAULT_KERNEL_STORE_SIZE >> 20,
                        help="size cap in MiB applied after a prefetch")
    parser.add_argument("--suites", action="append", default=[], metavar="SUITES",
                        help="fetch from these Debian suites (as the server's --fetch-suites: "
                        "SUITE or SUITE=URI, separated by commas) through the store's private "
                        "apt configuration, not the machine's apt sources; repeatable")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the stored releases, most recently used first")
    fetch = commands.add_parser("prefetch", help="fetch releases now")
    fetch.add_argument("releases", nargs="+", metavar="RELEASE")
    fetch.add_argument("--no-symbols", action="store_true",
                       help="only the build tree, not the System.map made from the kernel image")
    fetch.add_argument("--debuginfo", action="store_true",
                       help="also the vmlinux debuginfo (linux-image-RELEASE-dbg, about 860 MB "
                       "to download)")
    remove = commands.add_parser("remove", help="remove stored releases (and the symbols of "
                                 "installed ones)")
    remove.add_argument("releases", nargs="+", metavar="RELEASE")
    _run_parser(commands)
    verify = commands.add_parser("verify", help="build probe kinds for a release through a "
                                 "server and run them on its kernel in a VM, with each "
                                 "client's staprun; keep the result")
    verify.add_argument("release", metavar="RELEASE")
    verify.add_argument("--server", required=True, metavar="HOST:PORT",
                        help="the server that builds the modules (its certificate is "
                        "trusted for the verification only)")
    verify.add_argument("--client", action="append", default=[], metavar="PREFIX",
                        help="also a client installed under PREFIX (e.g. /opt/stap55)")
    verify.add_argument("--no-host-client", action="store_true",
                        help="not the machine's own client (/usr/bin/stap)")
    verify.add_argument("--timeout", type=float, default=900.0,
                        help="the bound on each VM run, in seconds (default 900)")
    verify.add_argument("--no-kvm", action="store_true", help="TCG even where KVM works")
    verify.add_argument("--json", action="store_true", help="the result as JSON")
    return parser


def _run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``run``'s words."""
    run = commands.add_parser("run", help="load a module on the release's kernel, booted "
                              "in a VM")
    run.add_argument("release", metavar="RELEASE")
    run.add_argument("module", metavar="MODULE.ko")
    run.add_argument("--staprun", default="host", help="the client's staprun: host (the "
                     "default), a prefix such as /opt/stap55, or a root directory")
    run.add_argument("--staprun-program", metavar="PATH",
                     help="copy this staprun program instead of the client's own (a readable "
                     "copy: 5.5 installs staprun mode 4110, which only root can read)")
    run.add_argument("--command", "-c", dest="target", help="staprun's -c: a command to run (absolute path)")
    run.add_argument("--file", action="append", default=[], metavar="PATH",
                     help="a program to put at the same path in the VM: the --staprun "
                     "root's (with its libraries), else this machine's")
    run.add_argument("--option", action="append", default=[], metavar="OPTION",
                     help="one more word for staprun's command line")
    run.add_argument("--group", choices=("stapusr", "stapsys"),
                     help="run staprun as a user of this group, not as root")
    run.add_argument("--signers", metavar="DIR", help="an NSS database of trusted module "
                     "signers, put where the staprun looks for them")
    run.add_argument("--seconds", type=int, default=120,
                     help="how long staprun may run in the VM (default 120)")
    run.add_argument("--timeout", type=float, default=900.0,
                     help="the bound on the whole VM run, in seconds (default 900)")
    run.add_argument("--no-kvm", action="store_true", help="TCG even where KVM works")
    run.add_argument("--json", action="store_true", help="the outcome as one JSON object")


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
            try:
                removed = remove_release(store, release)
            except InUse:
                print(f"Release {release} is in use by a compile; not removed (try again when "
                      "it is answered)", file=sys.stderr)
                status = 1
                continue
            if not removed:
                print(f"No release {release} in {store.directory}", file=sys.stderr)
                status = 1
        return status
    try:
        arguments.apt = private_apt(store, arguments.suites)
    except (SuiteError, AptSetupError) as exc:
        print(f"--suites: {exc}", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    if arguments.command == "run":
        return _run_command(arguments, store)
    if arguments.command == "verify":
        return _verify_command(arguments, store)
    codes: list[int] = []

    async def run(reactor: IServerReactor) -> None:
        codes.append(await prefetch(reactor, store, arguments.releases, sys.stdout,
                                    symbols=not arguments.no_symbols,
                                    debuginfo=arguments.debuginfo, apt=arguments.apt))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code)
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
