"""Verifying a release: the server builds a small set of probe kinds for it
through each client it serves (the real ``stap --use-server``, as users
do), and each module is loaded with that client's own ``staprun`` on the
release's kernel, booted in a VM.  The result is one
:class:`~stapsrv.vm.verification.Verification`."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrs import define, evolve, field, frozen
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from stapsrv.config.values import default_stap
from stapsrv.kernel.fetch import FetchFailed, KernelFetcher
from stapsrv.kernel.toolchains import family
from stapsrv.reactor import IHandlerReactor
from stapsrv.vm.initramfs import BUSYBOX, Job, MissingFile, Staprun
from stapsrv.vm.runner import VmRunner
from stapsrv.vm.userland import ensure_userland
from stapsrv.vm.verification import ProbeResult, Verification

#: A program the probes watch: it opens and reads a file, printing nothing.
WORKLOAD = "/usr/bin/busybox grep -q Linux /proc/version"
_VERSION = re.compile(r"version (\S+?)/")


@frozen
class Probe:
    name: str
    script: str
    #: The line the module prints.
    expected: str
    #: staprun's -c, and the files the VM needs for it.
    command: str | None = None
    files: tuple[str, ...] = ()


def _probe(name: str, point: str, workload: bool = False) -> Probe:
    line = f"stapsrv-verify {name}"
    return Probe(name, f'probe {point} {{ println("{line}"); exit() }}', line,
                 WORKLOAD if workload else None, ("/usr/bin/busybox",) if workload else ())


#: The workload of an arm64 VM: the busybox of the arm64 userland (the
#: machine's own programs do not run there).
ARM64_WORKLOAD = "/stapsrv/busybox grep -q Linux /proc/version"

#: The probe kinds a release is verified with.
PROBES = (
    _probe("begin", "begin"),
    _probe("kprobe", 'kprobe.function("vfs_read")', workload=True),
    _probe("syscall", "nd_syscall.openat", workload=True),
    _probe("timer", "timer.ms(100)"),
    _probe("process", 'process("/usr/bin/busybox").begin', workload=True),
)


@frozen
class ClientSpec:
    """A client the server serves: its ``stap`` and its own ``staprun``."""

    stap: str
    staprun: Staprun

    @classmethod
    def host(cls) -> ClientSpec:
        return cls("/usr/bin/stap", Staprun.host())

    @property
    def is_host(self) -> bool:
        return self.staprun == Staprun.host()

    @classmethod
    def prefix(cls, prefix: str) -> ClientSpec:
        return cls(f"{prefix.rstrip('/')}/bin/stap", Staprun.prefix(prefix))


def version_of(text: str) -> str:
    """The version in ``stap -V``'s first line (``4.8``), else the line."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown"
    found = _VERSION.search(line)
    return found.group(1) if found else line


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


@define(eq=False)
class Verifier:
    reactor: IHandlerReactor
    fetcher: KernelFetcher
    runner: VmRunner
    #: The server the clients compile with (``HOST:PORT``).
    server: str
    #: A private directory for the clients' files and modules.
    work: Path
    probes: Sequence[Probe] = PROBES
    log: Logger = field(factory=lambda: Logger(namespace="stapsrv.vm"))
    #: ``-a arm64`` for another architecture's release.
    dash_a: tuple[str, ...] = ()
    #: The VM's busybox (the kernel's architecture's).
    busybox: str = BUSYBOX

    async def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        out, err, code = await getProcessOutputAndValue(  # type: ignore[no-untyped-call]
            argv[0], argv[1:], env=dict(env or {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}),
            path=str(cwd) if cwd else None, reactor=self.reactor)
        return out, err, code

    async def translator(self) -> str:
        out, err, code = await self.run([default_stap(), "-V"])
        return (out + err).decode(errors="replace").strip().splitlines()[0] if code == 0 \
            else f"{default_stap()} -V failed"

    async def verify(self, release: str, clients: Sequence[ClientSpec]) -> Verification:
        """Every probe kind with every client: FetchFailed when the
        release's kernel image cannot be had."""
        kernel = await self.fetcher.ensure_image(release)
        if self.fetcher.via(release) == "arm64":
            return await self._verify_arm64(release, kernel, clients)
        translator = await self.translator()
        results: list[ProbeResult] = []
        for number, client in enumerate(clients):
            results += await self._client(release, kernel, client, self.work / f"client-{number}")
        return Verification(release, time.time(), translator, tuple(results))

    async def _verify_arm64(self, release: str, kernel: Path,
                            clients: Sequence[ClientSpec]) -> Verification:
        """An arm64 release: its modules cross-built (``-a arm64``), run in
        qemu-system-aarch64 with Debian's arm64 staprun of each client's
        family (4.x: bookworm's 4.8; 5.x: trixie's) and busybox; no
        ``process`` probe (the server would read its own amd64 busybox for
        it)."""
        root = await ensure_userland(self.fetcher, "arm64")
        arm64 = Verifier(self.reactor, self.fetcher,
                         VmRunner(self.reactor, self.runner.settings.for_arm64(),
                                  self.runner.log),
                         self.server, self.work,
                         tuple(evolve(probe, command=ARM64_WORKLOAD, files=())
                               if probe.command else probe
                               for probe in self.probes if probe.name != "process"),
                         self.log, dash_a=("-a", "arm64"),
                         busybox=str(root / "bin" / "busybox"))
        translator = await self.translator()
        results: list[ProbeResult] = []
        for number, client in enumerate(clients):
            out, err, code = await self.run([client.stap, "-V"])
            wanted = family(version_of((out + err).decode(errors="replace")))
            try:
                own = await ensure_userland(self.fetcher, "arm64", wanted)
            except FetchFailed as exc:
                results += [ProbeResult(client.stap, probe.name, False,
                                        f"no arm64 staprun of this client's family: {exc}")
                            for probe in arm64.probes]
                continue
            results += await arm64._client(release, kernel,
                                           ClientSpec(client.stap, Staprun.in_root(own)),
                                           self.work / f"client-{number}")
        return Verification(release, time.time(), translator, tuple(results))

    async def _client(self, release: str, kernel: Path, client: ClientSpec,
                      base: Path) -> list[ProbeResult]:
        out, err, code = await self.run([client.stap, "-V"])
        name = version_of((out + err).decode(errors="replace"))
        if code != 0:
            return [ProbeResult(client.stap, probe.name, False, f"{client.stap} -V failed: "
                                f"{_last_line(err)}") for probe in self.probes]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(base), "LC_ALL": "C.UTF-8",
               "SYSTEMTAP_DIR": str(base / "systemtap")}
        (base / "systemtap").mkdir(parents=True, exist_ok=True)
        out, err, code = await self.run(
            [client.stap, f"--use-server={self.server}", "--trust-servers=ssl,no-prompt"],
            env, base)
        results = []
        for probe in self.probes:
            results.append(await self._probe(release, kernel, client, name, probe, env,
                                             base / probe.name))
        return results

    async def _probe(self, release: str, kernel: Path, client: ClientSpec, name: str,
                     probe: Probe, env: Mapping[str, str], cwd: Path) -> ProbeResult:
        cwd.mkdir(parents=True, exist_ok=True)
        out, err, code = await self.run(
            [client.stap, f"--use-server={self.server}", *self.dash_a, "-r", release, "-p4",
             "-e", probe.script], env, cwd)
        modules = sorted(cwd.glob("*.ko"))
        if code != 0 or not modules:
            return ProbeResult(name, probe.name, False,
                               f"no module: {_last_line(err) or f'stap exit {code}'}")
        job = Job(modules[0], command=probe.command, files=probe.files)
        try:
            outcome = await self.runner.run(kernel, client.staprun, job, self.fetcher.in_thread,
                                            scratch=self.work, busybox=self.busybox)
        except MissingFile as exc:
            return ProbeResult(name, probe.name, False, str(exc))
        if outcome.status == 0 and probe.expected in outcome.output.splitlines():
            return ProbeResult(name, probe.name, True)
        failure = outcome.summary() if outcome.status != 0 else \
            f"printed {outcome.output.strip()[:200]!r}, not {probe.expected!r}"
        return ProbeResult(name, probe.name, False, failure)
