"""What the server does with one request archive, start to finish.

``RequestHandler.handle`` parses the request once (:mod:`stapsrv.compile.job`)
and answers a repeated one from the response cache; otherwise it unpacks
it into a scratch directory under ``$TMPDIR`` and runs it the way 4.8
does, in three steps: *prepare* (thread pool: the response directory, the
environment, the command line), *run* (reactor thread: the translator, its
timeout, abandonment) and *finish* (thread pool: signatures, ``rc``, path
filtering).  It returns the response archive, or ``None`` when 4.8 would
close the connection without an answer.  Identical requests that arrive
while one is compiling wait for its answer instead of compiling again.

The handler asks :class:`~stapsrv.compile.releases.ServedReleases` about
the releases it builds for (and to fetch one it has not got), and leaves
the server's own warm-up compiles to :class:`~stapsrv.compile.warmup.WarmUp`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from stapsrv import PROTOCOL_VERSION
from stapsrv.blocking import Blocking
from stapsrv.cache.key import KeyMaker, Uncacheable
from stapsrv.cache.store import ResponseCache, find_answer
from stapsrv.compile.archive import RequestRejected, build_response, refusal_archive
from stapsrv.compile.context import RequestContext
from stapsrv.compile.job import Job, needs_signature, parse_job, write_request
from stapsrv.compile.observer import NoObserver, RequestObserver
from stapsrv.compile.policy import Policy
from stapsrv.compile.releases import ServedReleases
from stapsrv.compile.sandbox import SYSROOT, Sandbox, StapconfStore, translator_environment
from stapsrv.compile.scratch import MODULE_DIR, make_scratch
from stapsrv.compile.signing import sign_module_file, signature_digest
from stapsrv.compile.slots import FairGate
from stapsrv.compile.translator import TranslatorRun, start_translator
from stapsrv.compile.warmup import WarmUp
from stapsrv.config.values import ServerConfig
from stapsrv.core.architectures import (
    CROSS_PREFIXES,
    cross_options,
    release_architecture,
    request_target,
)
from stapsrv.core.budget import OverBudget
from stapsrv.core.cmdline import (
    Privilege,
    ServerOption,
    guru_mode,
    translator_argv,
    without_release,
)
from stapsrv.core.counters import Counters
from stapsrv.core.logtext import escape_controls
from stapsrv.core.rewrite import StreamReplacer
from stapsrv.identity import mok
from stapsrv.identity.certs import ServerIdentity
from stapsrv.kernel.fetch import KernelFetcher
from stapsrv.kernel.sysroots import UserRoot, UserSpace, host_distribution, user_space
from stapsrv.kernel.toolchains import (
    Toolchain,
    choose,
    host_paths,
    kernel_compiler,
    kernel_version,
)
from stapsrv.paths import home_directory, systemtap_dir
from stapsrv.reactor import IHandlerReactor

#: Below this many free bytes after a failed compile, the disk is full.
_DISK_FULL_BYTES = 64 * 1024


class DiskFull(Exception):
    """The scratch filesystem has no room for this request."""


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _ran_out_of_room(scratch: Path) -> bool:
    """After a failed compile: is the scratch filesystem (nearly) full, or
    did the translator or the compiler say it was?"""
    try:
        info = os.statvfs(scratch)
        if info.f_bavail * info.f_frsize < _DISK_FULL_BYTES or info.f_favail == 0:
            return True
    except OSError:
        return False
    try:
        with open(scratch / "response" / "stderr", "rb") as stderr:
            return b"No space left on device" in stderr.read(1 << 20)
    except OSError:
        return False


def _signal_message(number: int, config: ServerConfig) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    message = f"Server: The translator was ended by {name}."
    limits = config.limits
    reasons: dict[int, tuple[str, str]] = {
        signal.SIGXCPU: ("cpu_seconds", "its CPU time limit (--cpu-limit)"),
        signal.SIGXFSZ: ("file_size", "its file size limit (--file-size-limit)")}
    if number in reasons and getattr(limits, reasons[number][0]) is not None:
        message += f" It went past {reasons[number][1]}."
    elif number == signal.SIGKILL and limits.cpu_seconds is not None:
        message += " It may have gone past its CPU time limit (--cpu-limit)."
    return message


def _copied(runtimes: Mapping[str, str]) -> dict[str, str]:
    """The handler's own copy: stored releases add their runtimes to it."""
    return dict(runtimes)


@frozen
class Outcome:
    """What became of a request: the answer (None: close without one),
    whether it reports success, and the form of it to keep in the cache."""

    response: bytes | None
    succeeded: bool
    to_keep: bytes | None = None
    #: The cache tier it came from (None: not from a cache).
    tier: str | None = None
    #: Refused by the server's checks or policy, not compiled.
    refused: bool = False

    @property
    def label(self) -> str:
        """Its name among :data:`stapsrv.compile.observer.OUTCOMES`."""
        if self.refused:
            return "refused"
        if not self.succeeded:
            return "failed"
        return "compiled" if self.tier is None else "cached"


def repeated_answer_member(name: str) -> bool:
    """Whether a response member is part of the answer a warm translator
    gives: everything but kbuild's leftovers in the module directory."""
    if not name.startswith(MODULE_DIR + "/"):
        return True
    inner = name[len(MODULE_DIR) + 1:]
    if inner in ("", "uprobes/") or inner.startswith("uprobes/"):
        return True
    if "/" in inner or inner.startswith("."):
        return False
    return inner.endswith((".ko", ".ko.sgn", "_src.c"))


@frozen
class Prepared:
    """A request ready for the translator: where it runs, and how."""

    scratch: Path
    release: str
    argv: list[str]
    env: dict[str, str]
    client_moks: tuple[str, ...]
    #: bwrap's words before the translator's (empty without a sandbox).
    sandbox: tuple[str, ...] = ()

    @property
    def request_dir(self) -> Path:
        return self.scratch / "request"

    @property
    def response_dir(self) -> Path:
        return self.scratch / "response"

    @property
    def module_dir(self) -> Path:
        return self.response_dir / MODULE_DIR


@frozen
class Refused:
    """A request the translator never sees (the client is told why)."""

    log_format: str
    release: str | None


#: What preparing a request comes to.
Preparation = Prepared | Refused


@define(eq=False)
class RequestHandler:
    config: ServerConfig
    reactor: IHandlerReactor
    pool: ThreadPool
    #: Where its blocking work runs.
    _in_thread: Blocking = field(init=False, default=Factory(
        lambda self: Blocking(self.reactor, self.pool), takes_self=True))
    identity: Callable[[], ServerIdentity]
    runtimes: dict[str, str] = field(factory=dict, converter=_copied)
    environ: Mapping[str, str] = field(factory=lambda: dict(os.environ))
    cache: ResponseCache | None = None
    keys: KeyMaker | None = None
    counters: Counters = field(factory=Counters)
    observer: RequestObserver = field(factory=NoObserver)
    #: The translator's sandbox as given (:attr:`sandbox`: as it is now) and
    #: the stapconf headers it shares; None with ``--no-sandbox``.
    _initial_sandbox: Sandbox | None = field(default=None, alias="sandbox", repr=False)
    stapconf: StapconfStore | None = None
    #: The toolchains it answers with, the host's first
    #: (:mod:`stapsrv.kernel.toolchains`); empty or the host's alone: every
    #: request goes to the host's translator, as before toolchains.
    toolchains: list[Toolchain] = field(factory=list)
    #: The server's own distribution (its installed releases' clients run
    #: it): user-space probes of its releases resolve against its files.
    distribution: str | None = field(factory=host_distribution)
    #: Roots of other distributions' user space (:mod:`stapsrv.kernel.sysroots`).
    user_roots: list[UserRoot] = field(factory=list)
    #: Fetches releases that are not installed into the kernel store; None
    #: with ``--no-fetch`` (and in tests of the handler alone).
    kernels: KernelFetcher | None = None
    #: Told (in the reactor thread) of each release the handler starts
    #: serving from the kernel store.
    on_release_added: Callable[[str], None] | None = None
    #: The Debian architectures it builds for, the server's own first
    #: (empty: its own only, unchecked, as in tests of the handler alone).
    architectures: tuple[str, ...] = ()
    #: Where cache keys are computed (None: ``pool``): a pool of their own,
    #: so that a slow key never holds a slot requests need.
    key_pool: ThreadPool | None = None
    log: Logger = field(init=False)
    #: The releases this handler builds for: installed and adopted from the
    #: kernel store, with their symbols.
    releases: ServedReleases = field(init=False)
    policy: Policy = field(init=False)
    _flights: dict[str, list[Deferred[bytes | None]]] = field(init=False, factory=dict)
    _running: set[TranslatorRun] = field(init=False, factory=set)
    #: Bounds the requests that go to the translator (``--max-threads``),
    #: a free slot going to client addresses in turn; answers from the
    #: cache need no slot.
    gate: FairGate = field(init=False)
    #: The server's own compiles that make the kernel configuration headers.
    warmup: WarmUp = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = Logger(namespace=self.config.log_namespace, source=self)
        self.gate = FairGate(self.config.concurrency)
        config = self.config
        self.policy = Policy.from_values(config.allow, config.refuse_guru, config.privileges)
        self.releases = ServedReleases(
            config, self.reactor, self.pool, self.runtimes, sandbox=self._initial_sandbox,
            kernels=self.kernels, on_release_added=self._release_added, log=self.log)
        self.warmup = WarmUp(config, self.reactor, self.pool, self.releases, self,
                             self.stapconf, self.gate, self._running, log=self.log)

    @property
    def sandbox(self) -> Sandbox | None:
        """The translators' sandbox now: adopting a stored tree adds its
        fixed runtime to what it shows."""
        return self.releases.sandbox

    def _release_added(self, release: str) -> None:
        if self.on_release_added is not None:
            self.on_release_added(release)

    async def handle(self, body: bytes, context: RequestContext) -> bytes | None:
        self.counters.requests += 1
        started = self.reactor.seconds()
        try:
            outcome = await self._answer(body, context)
        finally:
            self.releases.finish_work(context)
        if not outcome.succeeded:
            self.counters.failures += 1
        if outcome.tier is not None:
            self.observer.cache_hit(outcome.tier)
        self.observer.request_done(outcome.label, self.reactor.seconds() - started)
        return outcome.response

    def _rejected(self, exc: RequestRejected) -> Outcome:
        """The answer to an archive that cannot be used."""
        self.log.info("{message}", message=escape_controls(str(exc)))
        self.log.info("Error processing client request")
        if exc.client_message is None:
            return Outcome(None, False, refused=True)
        return Outcome(refusal_archive(exc.client_message, PROTOCOL_VERSION), False,
                       refused=True)

    async def _answer(self, body: bytes, context: RequestContext) -> Outcome:
        try:
            job = await self._in_thread(parse_job, body, self.config.max_request_size)
        except RequestRejected as exc:
            return self._rejected(exc)
        # Before the cache: an answer made before the policy was set is refused too.
        refusal = self.policy.request_refusal(job.arguments, job.privilege)
        if refusal is not None:
            self.log.info("Refusing the request from {peer}: {reason}", peer=context.peer,
                          reason=escape_controls(refusal))
            return Outcome(refusal_archive(refusal, PROTOCOL_VERSION), False, refused=True)
        refusal = self._architecture_refusal(job)
        if refusal is not None:
            self.log.info("Refusing the request from {peer}: {reason}", peer=context.peer,
                          reason=escape_controls(refusal))
            return Outcome(refusal_archive(refusal, PROTOCOL_VERSION), False, refused=True)
        ready = await self._release_ready(job, context)
        if ready is not None:
            return ready
        key = await self._cache_key(job, context)
        if key is None or self.cache is None:
            return await self._compile(body, job, context)
        hit = await self._answer_from_cache(key, context)
        if hit is not None:
            return hit
        flight = self._flights.get(key)
        if flight is not None:
            waiter: Deferred[bytes | None] = Deferred()
            flight.append(waiter)
            shared = await waiter
            if shared is not None:
                self.counters.cache_hits += 1
                self.log.info("Answering {peer} with the compile it waited for ({key})",
                              peer=context.peer, key=key[:16])
                return Outcome(shared, True, tier="inflight")
            return await self._compile(body, job, context)
        self._flights[key] = []
        outcome = Outcome(None, False)
        try:
            outcome = await self._compile(body, job, context)
        finally:
            # An answer that carries this request's own Server: notes (its
            # address's kernel store work left out) is its alone: others
            # compile their own rather than read another client's lines.
            share = outcome.response if outcome.succeeded and not context.notes else None
            for waiter in self._flights.pop(key):
                waiter.callback(share)
        if outcome.succeeded and outcome.to_keep is not None:
            await self.cache.put(key, outcome.to_keep)
        return outcome

    def _architecture_refusal(self, job: Job) -> str | None:
        """Why a request's architecture cannot be built here (its sysinfo
        and ``-a`` disagree, its kernel is another architecture's, or this
        server does not build for it), or None."""
        if not self.architectures:
            return None
        return request_target(job.architecture, job.dash_a, job.release,
                              self.architectures[0], self.architectures).refusal

    def _cross_refusal(self, job: Job, context: RequestContext) -> str | None:
        """Another architecture's kernel needs a toolchain with that
        architecture's cross compiler (the host's has it from ``make
        setup``; a toolchain root has it when it was made with it)."""
        toolchain = context.toolchain
        target = release_architecture(job.release or "")
        if (toolchain is None or toolchain.is_host or not self.architectures
                or target not in CROSS_PREFIXES or target == self.architectures[0]
                or toolchain.has_cross_compiler(CROSS_PREFIXES[target])):
            return None
        refusal = (f"Server: Kernel release '{job.release}' is an {target} kernel; toolchain "
                   f"{toolchain.name} (SystemTap {toolchain.translator}), which serves this "
                   f"client, has no {CROSS_PREFIXES[target]}gcc cross compiler (the server's "
                   f"administrator can add it: python -m stapsrv.cli.toolchains update "
                   f"{toolchain.name}).")
        self.log.info("Refusing the request from {peer}: {reason}", peer=context.peer,
                      reason=escape_controls(refusal))
        return refusal

    async def _release_ready(self, job: Job, context: RequestContext) -> Outcome | None:
        """The request's release provided (fetched if need be), with what
        the kernel store has for it; or the answer that ends the request now
        (a refusal, or a cache hit while its symbols are still being made)."""
        # Before fetching: no toolchain may build that kernel for this client.
        refusal = await self._choose_toolchain(job, context, with_tree=False)
        if refusal is None:
            refusal = self._cross_refusal(job, context)
        if refusal is not None:
            return Outcome(refusal_archive(refusal, PROTOCOL_VERSION), False, refused=True)
        try:
            problem = await self.releases.provide_release(job.release, context)
        except OverBudget as exc:
            return Outcome(refusal_archive(str(exc), PROTOCOL_VERSION), False, refused=True)
        if problem is not None:
            return Outcome(refusal_archive(problem, PROTOCOL_VERSION), False)
        if job.release is not None and self.releases.serves(job.release):
            refusal = await self._choose_toolchain(job, context, with_tree=True)
            if refusal is not None:
                return Outcome(refusal_archive(refusal, PROTOCOL_VERSION), False, refused=True)
            if self.releases.symbols_pending(job.release):
                # Symbols still being made never hold a repeated request:
                # an answer made without them is answered as it is.
                cached = await self._cached(job, context)
                if cached is not None:
                    return cached
            self._warm_up_ahead(job, context)
            await self.releases.provide_debug_within(job.release, context)
            await self.releases.provide_module_debug(job.release, job.named_modules,
                                                     job.privilege, context)
        return None

    def _warm_up_ahead(self, job: Job, context: RequestContext) -> None:
        """While the symbols of the request's release are made, its warm-up
        runs beside them (in a slot of its own) rather than after them."""
        guru = guru_mode(job.arguments)
        if (self.sandbox is None or job.release is None or not self.config.fetch_symbols
                or self.releases.debug_files(job.release) is not None
                or self.warmup.known_ready(job.release, guru, context.toolchain)):
            return  # no symbols to be made, or nothing to warm up
        Deferred.fromCoroutine(self.warmup.ahead(job.release, guru, context,
                                                 context.toolchain))

    async def _cached(self, job: Job, context: RequestContext) -> Outcome | None:
        """The cache's answer under the key the request has now, if any."""
        key = await self._cache_key(job, context)
        return None if key is None else await self._answer_from_cache(key, context)

    async def _answer_from_cache(self, key: str, context: RequestContext) -> Outcome | None:
        assert self.cache is not None
        found = await find_answer(self.cache, key)
        if found is None:
            return None
        cached, tier = found
        self.counters.cache_hits += 1
        self.log.info("Answering {peer} from the cache ({key})", peer=context.peer,
                      key=key[:16])
        return Outcome(cached, True, tier=tier)

    async def _choose_toolchain(self, job: Job, context: RequestContext,
                                with_tree: bool) -> str | None:
        """The toolchain that answers the request (``context.toolchain``),
        from the client's version and the kernel (``with_tree``: its
        headers' compiler too); the client's one ``Server:`` line when none
        fits.  Nothing to choose with the host's toolchain alone."""
        if len(self.toolchains) < 2 or job.release is None or self.sandbox is None:
            return None  # other toolchains run in the sandbox only
        chosen = await self._in_thread(self._toolchain_for, job, with_tree)
        if isinstance(chosen, str):
            self.log.info("Refusing the request from {peer}: {reason}", peer=context.peer,
                          reason=escape_controls(chosen))
            return chosen
        context.toolchain = chosen
        return None

    def _toolchain_for(self, job: Job, with_tree: bool) -> Toolchain | str:
        release = job.release
        assert release is not None
        tree = self.releases.tree(release) if with_tree else None
        compiler = kernel_compiler(tree) if tree is not None else None
        target = release_architecture(release)
        if (compiler is not None and self.architectures and target in CROSS_PREFIXES
                and target != self.architectures[0]):
            # Cross-built: CROSS_COMPILE's prefix before the headers' CC.
            compiler = CROSS_PREFIXES[target] + compiler
        return choose(self.toolchains, job.client_version, release,
                      kernel_version(release, tree), compiler)

    def translator(self, toolchain: Toolchain | None) -> str:
        """The translator program a toolchain runs (None: the host's)."""
        return self.config.stap if toolchain is None or toolchain.is_host else toolchain.stap

    def stapconf_for(self, toolchain: Toolchain | None) -> StapconfStore | None:
        """The kernel configuration headers of a toolchain's translator."""
        if self.stapconf is None or toolchain is None or toolchain.is_host:
            return self.stapconf
        return StapconfStore(self.stapconf.directory.with_name(
            f"{self.stapconf.directory.name}-{toolchain.name}"))

    async def _cache_key(self, job: Job, context: RequestContext) -> str | None:
        if self.cache is None or self.keys is None:
            return None
        try:
            return await Blocking(self.reactor, self.key_pool or self.pool)(
                self._make_key, job, context.toolchain)
        except Uncacheable as exc:
            self.log.info("Not caching the answer to {peer}: {reason} {path}",
                          peer=context.peer, reason=escape_controls(exc.reason),
                          path=escape_controls(exc.path[:256]))
            return None
        except Exception:
            self.log.failure("Cannot compute a cache key; compiling")
            return None

    def _make_key(self, job: Job, toolchain: Toolchain | None = None) -> str | None:
        assert self.keys is not None
        release = job.release
        if release is None or not self.releases.serves(release):
            return None
        host = toolchain is None or toolchain.is_host
        runtime = (self.config.runtime or self.runtimes.get(release)) if host else None
        options = [self.translator(toolchain)] + [
            option.flag + (option.value or "")
            for option in self.server_options(release, toolchain)]
        if toolchain is not None and not host:
            # Its name and manifest digest: every package version in its root.
            options.append("toolchain " + toolchain.label())
            sysroot = self.user_space(release, toolchain)
            if sysroot.root is not None and self.sandbox is not None:
                # The files named are fingerprinted as the server sees them
                # (the host's); a made root or a toolchain's by its manifest
                # digest in the label.
                options.append("user space " + sysroot.label)
        # What a translator can read differs with and without the sandbox.
        options.append("sandbox" if self.sandbox is not None else "no sandbox")
        debug = self.releases.debug_files(release)
        if debug is not None and debug.vmlinux is not None:
            options.append("debuginfo " + str(debug.vmlinux))
        if self.releases.module_debug is not None:
            options += self.releases.module_debug.key_words(release, job.named_modules)
        signers: list[bytes] = []
        if needs_signature(job):
            signers.append(self.identity().certificate_der)
        if job.wants_mok:
            store = self.config.moks(self.environ)
            for name in mok.server_moks(store):
                signers.append((store / name / mok.CERTIFICATE).read_bytes())
        return self.keys.key(job, release, options, runtime, signers,
                             build=self.releases.stored_tree(release),
                             symbols=debug.system_map if debug is not None else None)

    async def _compile(self, body: bytes, job: Job, context: RequestContext) -> Outcome:
        """Run the request through the translator, once a slot is free and
        it is its address's turn."""
        address = context.address
        await self.gate.acquire_for(address)
        try:
            if context.abandoned:
                return Outcome(None, False)
            if job.release is not None and self.releases.serves(job.release):
                # What it reads of the kernel store is held from now until it
                # is answered (not while it waited: a cache hit holds nothing).
                problem = await self.releases.hold(job.release, context)
                if problem is not None:
                    return Outcome(refusal_archive(problem, PROTOCOL_VERSION), False)
            return await self._compile_in_scratch(body, job, context)
        except DiskFull:
            pass
        except OSError as exc:
            if not _is_disk_full(exc):
                raise
        finally:
            self.gate.release_for(address)
        self.log.error("No space left in {tmpdir} for the request from {peer}",
                       tmpdir=self.config.tmpdir, peer=context.peer)
        return Outcome(refusal_archive(
            "Server: The server ran out of disk space in its temporary directory while "
            "handling this request.  Try again later, or tell the server's administrator.",
            PROTOCOL_VERSION), False)

    async def _compile_in_scratch(self, body: bytes, job: Job,
                                  context: RequestContext) -> Outcome:
        scratch = await self._in_thread(make_scratch, self.config.tmpdir)
        try:
            try:
                await self._in_thread(_unpack, scratch, body, job)
            except RequestRejected as exc:
                if _is_disk_full(exc.__cause__ or exc):
                    raise DiskFull() from exc
                return self._rejected(exc)
            status = await self._process(scratch, job, context)
            if context.abandoned or status is None:
                return Outcome(None, False)
            response = await self._in_thread(build_response, scratch / "response")
            to_keep = None
            if status == 0 and self.cache is not None and not context.notes:
                # What the translator sends once its own cache is warm: a cold
                # build also leaves kbuild's intermediate files in the module
                # directory, which repeated answers should not carry (4.8's
                # do not).
                to_keep = await self._in_thread(
                    build_response, scratch / "response", repeated_answer_member)
            return Outcome(response, status == 0, to_keep)
        finally:
            if self.config.keep_temporary:
                self.log.info("Keeping temporary directory {directory}", directory=scratch)
            else:
                await self._in_thread(shutil.rmtree, scratch, True)

    async def _process(self, scratch: Path, job: Job, context: RequestContext) -> int | None:
        """Prepare, run and finish the request in ``scratch``; the answer's
        ``rc``, or None when there is no answer to send."""
        self.log.info("Client version is {version}",
                      version=escape_controls(job.client_version[:64]))
        prepared = await self._in_thread(self._prepare, scratch, job, tuple(context.notes),
                                         context.toolchain)
        if isinstance(prepared, Refused):
            self.log.info(prepared.log_format, release=escape_controls(str(prepared.release)))
            return 1
        if context.toolchain is not None:
            self.log.info("Toolchain {toolchain} answers {peer} (client {version}, kernel "
                          "{release})", toolchain=context.toolchain.describe(),
                          peer=context.peer, version=escape_controls(job.client_version[:64]),
                          release=prepared.release)
            self._log_user_space(prepared.release, context.toolchain)
        self.log.info("Options passed from the client: {arguments}",
                      arguments=escape_controls(
                          "".join(argument + " " for argument in job.arguments)))
        self.log.debug("Running {argv}", argv=prepared.argv)
        status = await self._run(prepared, context)
        if status is None:
            return None
        if context.cut_output:
            self.log.info("The translator for {peer} went past the output limit ({limit} "
                          "bytes) on its {streams}; stopping it", peer=context.peer,
                          limit=self.config.max_output,
                          streams=" and ".join(_STREAMS[fd] for fd in context.cut_output))
        rc = await self._in_thread(self._finish, prepared, job, status, context.timed_out,
                                   context.cut_output)
        if status > 128 and not context.timed_out and not context.cut_output:
            self.log.info("The translator for {peer} was ended by signal {signal}",
                          peer=context.peer, signal=status - 128)
        if job.invalid_privilege is not None:
            self.log.info("Invalid argument '{value}' for --privilege",
                          value=escape_controls(job.invalid_privilege))
        return rc

    # --- prepare (thread pool) ------------------------------------------------

    def _prepare(self, scratch: Path, job: Job, notes: tuple[str, ...] = (),
                 toolchain: Toolchain | None = None) -> Preparation:
        """The response directory, the translator's environment and command
        line (``notes``: the server's lines for the client's stderr); or the
        refusal of a release this server does not serve."""
        response_dir = scratch / "response"
        (response_dir / "version").write_text(PROTOCOL_VERSION)
        _append(response_dir / "stderr", list(notes))
        release = job.release
        if release is None:
            _refuse(response_dir, "Server: The request does not name a kernel "
                    "release (its sysinfo is missing or unreadable).")
            return Refused("Unable to read sysinfo", None)
        if not self.releases.serves(release):
            _refuse(response_dir, (
                f"Server: This server does not build modules for kernel release '{release}'.\n"
                f"Server: It serves: {', '.join(self.config.releases)}"
                + (f", and fetches releases matching: {' '.join(self.kernels.patterns)}."
                   if self.kernels is not None else ".")))
            return Refused("Target kernel version {release} is not supported by this server",
                           release)
        env = self.translator_environment(scratch)
        client_moks: tuple[str, ...] = ()
        if job.speaks_locale:
            env.update(job.locale.variables)
            complaints = list(job.locale.complaints)
            if job.mok_fingerprints is not None:
                parsed = mok.parse_client_fingerprints(job.mok_fingerprints)
                client_moks = parsed.fingerprints
                complaints += parsed.complaints
            _append(response_dir / "stderr", complaints)
        module_dir = response_dir / MODULE_DIR
        module_dir.mkdir(mode=0o700)
        arguments: Sequence[str] = job.arguments
        if self.releases.stored_tree(release) is not None:
            arguments = without_release(arguments, release)
        argv = translator_argv(self.translator(toolchain), self.releases.target(release),
                               self.server_options(release, toolchain), str(module_dir),
                               arguments)
        return Prepared(scratch, release, argv, env, client_moks,
                        self.sandbox_words(scratch, release, toolchain))

    def translator_environment(self, scratch: Path) -> dict[str, str]:
        """The translator's environment: the server's (only what the
        sandbox keeps, with one), ``TMPDIR`` the scratch directory."""
        env = (dict(self.environ) if self.sandbox is None
               else translator_environment(self.environ))
        env["TMPDIR"] = str(scratch)
        return env

    def sandbox_words(self, scratch: Path, release: str | None = None,
                      toolchain: Toolchain | None = None) -> tuple[str, ...]:
        """Make the sandbox's private directories in ``scratch`` (blocking)
        and return bwrap's words; nothing without a sandbox.  A toolchain
        other than the host's is the sandbox's system, with an installed
        release's host files shown in it."""
        if self.sandbox is None:
            return ()
        stapconf = self.stapconf_for(toolchain)
        assert stapconf is not None
        self.sandbox.prepare(scratch, systemtap_dir(self.environ) / "rc", stapconf)
        binds = self.releases.debug_binds(release)
        if toolchain is None or toolchain.is_host:
            return tuple(self.sandbox.words(scratch, binds))
        shown: list[Path] = []
        if (release is not None and not release.startswith("/")
                and self.releases.stored_tree(release) is None):
            shown = host_paths(self.releases.tree(release).resolve(), release)
        return tuple(self.sandbox.words(scratch, binds, toolchain.root, shown,
                                        self.user_space(release, toolchain).root))

    def user_space(self, release: str | None, toolchain: Toolchain | None) -> UserSpace:
        """Where ``toolchain``'s translator resolves the user-space probes
        of a request for ``release`` (:mod:`stapsrv.kernel.sysroots`)."""
        if toolchain is None or release is None or toolchain.is_host:
            return UserSpace(self.distribution)
        return user_space(toolchain, self.releases.suite(release), self.distribution,
                          self.toolchains, self.user_roots)

    def _log_user_space(self, release: str, toolchain: Toolchain) -> None:
        found = self.user_space(release, toolchain)
        if found.root is not None:
            self.log.info("User-space probes resolve against {root} ({distribution})",
                          root=found.label, distribution=found.distribution)
        elif found.missing:
            self.log.warn("No root of {distribution} on this server: user-space probes "
                          "resolve against toolchain {toolchain}'s own files",
                          distribution=found.distribution, toolchain=toolchain.name)

    def _seed_stapconf(self, scratch: Path, toolchain: Toolchain | None) -> None:
        """The headers made since the request's sandbox was prepared, copied
        into its private ``SYSTEMTAP_DIR`` (blocking)."""
        stapconf = self.stapconf_for(toolchain)
        if self.sandbox is None or stapconf is None:
            return
        stapconf.seed(self.sandbox.private_dirs(scratch)[1])

    def server_options(self, release: str,
                       toolchain: Toolchain | None = None) -> list[ServerOption]:
        """The server's own translator options for ``release``: for another
        toolchain than the host's, without ``-R`` (the server's runtimes
        are 4.8's; its translator has its own)."""
        options = list(self.config.server_options)
        target = release_architecture(release)
        if self.architectures and target is not None and target != self.architectures[0]:
            # Another architecture's kernel: cross-built, whatever -a the
            # server was given for its own.
            options = [option for option in options if option.flag != "-a"]
            options += [ServerOption(flag, value)
                        for flag, value in cross_options(target, self.architectures[0])]
        if toolchain is not None and not toolchain.is_host:
            options = [option for option in options if option.flag != "-R"]
            if self.sandbox is not None and self.user_space(release, toolchain).root:
                options.append(ServerOption("--sysroot=", str(SYSROOT)))
        elif self.config.runtime is None and release in self.runtimes:
            options.append(ServerOption("-R", self.runtimes[release]))
        if self.config.keep_temporary:
            # As 4.8: the translator keeps its whole build tree too.
            options.append(ServerOption("-k"))
        return options

    # --- run (reactor thread) ---------------------------------------------------

    async def _run(self, prepared: Prepared, context: RequestContext) -> int | None:
        """The translator's exit status, or None when there is no answer."""
        if context.abandoned:
            return None
        if self.sandbox is not None:
            try:
                await self.warmup.stapconf_ready(prepared.release,
                                                 guru_mode(prepared.argv[1:]), context,
                                                 context.toolchain)
            except OverBudget as exc:
                # Its translator makes the header for itself, in its own slot.
                note = f"{exc} Compiling without it meanwhile."
                context.notes.append(note)
                await self._in_thread(_append, prepared.response_dir / "stderr", [note])
            if context.abandoned:
                return None
            # Prepared before the warm-up it may have waited for: the header
            # that made is given to it now, or its translator makes it again.
            await self._in_thread(self._seed_stapconf, prepared.scratch, context.toolchain)
        # Its compile is no kernel store work: the address's share is free
        # once what it started (symbols still being made) is over.
        self.releases.let_go(context)
        response_dir = prepared.response_dir
        try:
            run = start_translator(
                self.reactor, prepared.argv, prepared.env, prepared.request_dir,
                response_dir / "stdout", response_dir / "stderr", self.config.limits,
                prepared.sandbox, self.config.max_output)
        except OSError as exc:
            if _is_disk_full(exc):
                raise
            self.log.error("Failed spawning translator: {error}", error=exc)
            return None
        context.translator = run
        self._running.add(run)
        self.counters.compiling += 1
        started = self.reactor.seconds()
        status: int | None = None
        timeout = self.config.compile_timeout
        timer = self.reactor.callLater(timeout, self._expire, context) if timeout > 0 else None
        try:
            status = await run.result
        finally:
            self._running.discard(run)
            self.counters.compiling -= 1
            self.observer.translator_done(self.reactor.seconds() - started, status)
            context.translator = None
            context.cut_output = run.cut_output
            if timer is not None and timer.active():
                timer.cancel()
        if context.abandoned:
            return None
        return status

    def warm_up(self) -> None:
        """Start the warm-up compiles of the served releases (in the
        background: :meth:`WarmUp.start`)."""
        self.warmup.start()

    def _expire(self, context: RequestContext) -> None:
        self.log.info("The translator for {peer} ran past the compile timeout "
                      "({timeout:g} s); stopping it", peer=context.peer,
                      timeout=self.config.compile_timeout)
        context.timed_out = True
        context.stop_translator()

    async def stop_translators(self) -> None:
        """End every translator still running (their clients are gone) and
        wait until each process group has been signalled to the end."""
        running = list(self._running)
        for run in running:
            run.kill()
        for run in running:
            await run.result

    # --- finish (thread pool) ---------------------------------------------------

    def _finish(self, prepared: Prepared, job: Job, status: int, timed_out: bool,
                cut_output: tuple[int, ...] = ()) -> int:
        """Blocking tail of a request: what stopped the translator,
        signatures, ``rc``, path filtering.  Returns the ``rc``."""
        response_dir = prepared.response_dir
        stopped = None
        if cut_output:
            streams = " and ".join(_STREAMS[fd] for fd in cut_output)
            stopped = (f"Server: The translator's {streams} went past the server's output "
                       f"limit ({_size(self.config.max_output)}, its --max-output): "
                       "the output was cut there and the translator stopped.")
        elif timed_out:
            stopped = ("Server: The translator ran longer than the server's compile timeout "
                       f"({self.config.compile_timeout:g} s) and was stopped.")
        if stopped is not None:
            _append(response_dir / "stderr", [stopped])
            (response_dir / "rc").write_text("1")
            self._hide_server_paths(response_dir)
            return 1
        if status != 0 and _ran_out_of_room(prepared.scratch):
            raise DiskFull()
        if status > 128:
            _append(response_dir / "stderr", [_signal_message(status - 128, self.config)])
        module_dir = prepared.module_dir
        privilege = job.privilege
        unprivileged = privilege in (Privilege.STAPUSR, Privilege.STAPSYS)
        client_moks = prepared.client_moks
        if status == 0 and (unprivileged or client_moks):
            module = self._single_module(module_dir)
            if module is not None and unprivileged:
                self._sign(module, job.client_version)
            if module is not None and client_moks:
                status = self._mok_sign(module, prepared.release, client_moks, response_dir)
        uprobes = module_dir / "uprobes" / "uprobes.ko"
        if uprobes.is_file() and uprobes.stat().st_size > 0:
            if privilege != Privilege.STAPDEV:
                self._sign(uprobes, job.client_version)
            if not job.speaks_locale:
                shutil.copyfile(uprobes, response_dir / "uprobes.ko")
        (response_dir / "rc").write_text(str(status))
        self._hide_server_paths(response_dir)
        return status

    def _hide_server_paths(self, response_dir: Path) -> None:
        """``<server>`` for the server's home and scratch paths in the output."""
        replacements = sorted({str(home_directory(self.environ)), str(response_dir)} - {"/"},
                              key=len, reverse=True)
        for name in ("stdout", "stderr"):
            _replace_in_file(response_dir / name, replacements, "<server>")

    def _single_module(self, module_dir: Path) -> Path | None:
        modules = sorted(module_dir.glob("*.ko"))
        if not modules:
            self.log.info("Unable to find a module in {directory}", directory=module_dir)
        elif len(modules) > 1:
            self.log.info("Too many modules ({count}) in {directory}",
                          count=len(modules), directory=module_dir)
        else:
            return modules[0]
        return None

    def _mok_sign(self, module: Path, release: str, client_moks: tuple[str, ...],
                  response_dir: Path) -> int:
        """Sign with a MOK the client has enrolled, or (as 4.8) send it one
        of ours to enroll and fail the request.  Returns the new ``rc``."""
        store = self.config.moks(self.environ)
        common = mok.matching_mok(store, client_moks)
        messages = []
        status = 0
        if common is not None:
            problem = mok.sign_module(self.releases.tree(release), store / common, module)
            if problem is not None:
                messages.append(problem)
                status = 1
        else:
            messages.append(mok.NO_MATCH)
            ours = mok.server_moks(store)
            offered = ours[0] if ours else mok.generate(store)
            shutil.copyfile(store / offered / mok.CERTIFICATE,
                            response_dir / mok.CERTIFICATE)
            messages.append(mok.SENT_CERTIFICATE)
            status = 1
        _append(response_dir / "stderr", messages)
        return status

    def _sign(self, module: Path, client_version: str) -> None:
        try:
            sign_module_file(self.identity().key, module, signature_digest(client_version))
        except OSError as exc:
            self.log.error("Unable to sign {module}: {error}", module=module, error=exc)


#: The translator's output streams by descriptor, as the client is told.
_STREAMS = {1: "standard output", 2: "standard error"}


def _size(count: int) -> str:
    """Bytes as the admin gave them (MiB), else in bytes."""
    return f"{count >> 20} MiB" if count % (1 << 20) == 0 else f"{count} bytes"


def _unpack(scratch: Path, body: bytes, job: Job) -> None:
    """The archive as received (kept with ``-k``) and its members."""
    fd = os.open(scratch / "request.zip", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
    write_request(job, scratch / "request")


def _append(path: Path, lines: list[str]) -> None:
    """Lines for the client's stderr (or stdout), each ended by a newline,
    the first on a line of its own (output cut at the limit may end mid-line)."""
    if not lines:
        return
    with open(path, "ab+") as stream:
        start = b""
        if stream.seek(0, os.SEEK_END) > 0:
            stream.seek(-1, os.SEEK_END)
            if stream.read(1) != b"\n":
                start = b"\n"
        stream.write(start + "".join(line + "\n" for line in lines).encode())


def _refuse(response_dir: Path, message: str) -> None:
    """Answer with rc 1 and a message, where 4.8 sent only ``version``."""
    (response_dir / "rc").write_text("1")
    (response_dir / "stdout").write_text("")
    _append(response_dir / "stderr", [message])


#: Bytes read at a time when rewriting the translator's output.
_CHUNK = 1 << 20


def _replace_in_file(path: Path, needles: list[str], replacement: str) -> None:
    """Replace the needles in ``path`` chunk by chunk (a new file put in its
    place when anything changed)."""
    replacer = StreamReplacer([os.fsencode(needle) for needle in needles],
                              replacement.encode())
    try:
        source = open(path, "rb")
    except FileNotFoundError:
        return
    rewritten = path.with_name(path.name + ".rewritten")
    with source, open(rewritten, "wb") as target:
        while chunk := source.read(_CHUNK):
            target.write(replacer.feed(chunk))
        target.write(replacer.finish())
    if replacer.changed:
        os.replace(rewritten, path)
    else:
        os.unlink(rewritten)
