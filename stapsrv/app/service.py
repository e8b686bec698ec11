"""The compile server as a Twisted service: certificate, listener, workers.

All I/O happens in ``startService`` (after twistd has dropped privileges)
and is undone in ``stopService``; constructing the service does nothing.
"""

from __future__ import annotations

import os
import pwd
import resource
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from stapsrv.app.admission import Admission, AdmissionEndpoint, AdmissionFactory
from stapsrv.app.health import Health, listening_check, space_check, translator_check
from stapsrv.app.listen import NotListening, listen_now
from stapsrv.app.proxies import trusted_proxy_endpoint
from stapsrv.app.server import CompileServerFactory, peer_host, peer_share
from stapsrv.app.toolchains import server_toolchains, server_user_roots
from stapsrv.app.watcher import ReleaseWatcher
from stapsrv.blocking import Blocking
from stapsrv.cache.fleet import RedisCache
from stapsrv.cache.key import KeyMaker
from stapsrv.cache.store import DiskCache, ResponseCache, TieredCache
from stapsrv.compile.handler import RequestHandler
from stapsrv.compile.prepare import ReleasePreparer
from stapsrv.compile.sharedconf import SharedStapconf
from stapsrv.compile.sandbox import Sandbox, SandboxUnavailable, StapconfStore, server_sandbox
from stapsrv.config.secret import SecretError, load_password, load_secret
from stapsrv.config.values import ServerConfig
from stapsrv.core.aptsources import series_patterns
from stapsrv.core.counters import Counters
from stapsrv.core.policyvalues import parse_networks
from stapsrv.identity.certs import ServerIdentity, server_context_factory
from stapsrv.identity.store import load_or_create_identity
from stapsrv.identity.trust import trust_certificate
from stapsrv.kernel.fetch import (
    KernelFetcher,
    debian_architecture,
    default_patterns,
)
from stapsrv.kernel import prepared
from stapsrv.kernel.children import run_child
from stapsrv.kernel.moduledebug import ModuleDebug
from stapsrv.kernel.privateapt import (
    APT_DIRECTORY,
    AptSetupError,
    ListsUpdater,
    PrivateApt,
    foreign_apts,
)
from stapsrv.kernel.runtime import default_cache_root, select_runtime
from stapsrv.kernel.store import KernelStore, store_directory
from stapsrv.paths import (
    MODULES,
    RootRefused,
    build_tree,
    installed_releases,
    local_client_db_dir,
    refuse_root,
    systemtap_dir,
)
from stapsrv.reactor import IServerReactor
from stapsrv.vm import verification

if TYPE_CHECKING:
    from stapsrv.app.metrics import ServerMetrics

#: Threads that compute cache keys (apart from the requests' pool).
KEY_THREADS = 2

#: Seconds a prepared release's VM verification may take (every probe
#: kind through every client, each VM boot bounded on its own).
VERIFY_TIMEOUT = 3 * 3600.0

#: How long ``stop`` lets requests being compiled finish before ending them.
SHUTDOWN_GRACE = 30.0


#: Open descriptors the server allows itself at most (idle connections
#: cost one each; admission lists them when near the limit).
OPEN_FILES = 1 << 20

#: The kernel's ceiling on any process's descriptor limit.
NR_OPEN = Path("/proc/sys/fs/nr_open")

#: The descriptor limit (soft, hard) before the first raise in this process.
_original_open_files: tuple[int, int] | None = None


def nr_open() -> int:
    """The kernel's ceiling on descriptors per process (``OPEN_FILES``
    when it cannot be read)."""
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return OPEN_FILES


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise the soft descriptor limit towards the hard one (which an
    unprivileged server cannot raise), to at most ``OPEN_FILES`` (and
    ``nr_open`` when the hard limit is unlimited).  Returns the limit the
    process had before (None: unchanged), for the translators, which need
    no more descriptors than they had."""
    global _original_open_files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = nr_open() if hard == resource.RLIM_INFINITY else hard
    wanted = min(ceiling, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
        else:
            if _original_open_files is None:
                _original_open_files = (soft, hard)
    return _original_open_files


class CompileServerService(Service):
    """One listening compile server."""

    def __init__(self, config: ServerConfig, reactor: IServerReactor,
                 admission: Admission | None = None) -> None:
        self.log = Logger(namespace=config.log_namespace, source=self)
        self.config = config
        self.reactor = reactor
        #: Room for new clients (shared by the process's servers; None:
        #: this server's own, made at start).
        self.admission = admission
        self.identity: ServerIdentity | None = None
        self.port: IListeningPort | None = None
        self.factory: CompileServerFactory | None = None
        self._pool: ThreadPool | None = None
        self._key_pool: ThreadPool | None = None
        self.counters = Counters()
        self._fleet: RedisCache | None = None
        self.kernels: KernelFetcher | None = None
        #: The Debian architectures it builds for, its own first (set at start).
        self.architectures: tuple[str, ...] = ()
        #: Update the lists of the suites named by --fetch-suites, and
        #: those of each other architecture (--fetch-architectures).
        self._lists: list[ListsUpdater] = []
        #: The kernel series each private apt's lists hold (by architecture).
        self._series: dict[str, tuple[str, ...]] = {}
        #: Called (in the reactor thread) when the server starts serving a
        #: release it fetched into its kernel store.
        self.on_releases_changed: list[Callable[[], None]] = []
        #: Prepares new releases of the lists (``--prepare-releases``).
        self.watcher: ReleaseWatcher | None = None
        #: The Prometheus metrics (with ``--metrics``).
        self.metrics: ServerMetrics | None = None
        if config.metrics:
            from stapsrv.app import metrics  # only with --metrics

            self.metrics = metrics.ServerMetrics(
                connections=lambda: len(self.factory.connections) if self.factory else 0,
                compiling=lambda: self.counters.compiling,
                waiting=lambda: self.factory.waiting if self.factory else 0,
                verifications=lambda: verification.load_all(store_directory(config)),
                preparations=lambda: prepared.load_all(store_directory(config)))

    def health(self) -> Health:
        """Whether this server can serve now (``/healthz``)."""
        config = self.config
        listening = self.port is not None
        where = f"[{self.listen_address}]:{self.port_number}" if listening else ""
        directories = [config.tmpdir]
        if config.cache_enabled:
            directories.append(config.response_cache_dir)
        return Health((listening_check(listening, where), translator_check(config.stap),
                       space_check(directories)))

    def served_releases(self) -> tuple[str, ...]:
        """The releases this server builds for: those it was given, then
        those its kernel store holds that it may serve (most recently used
        first)."""
        given = self.config.releases
        if self.kernels is None:
            return given
        preparing = self.watcher.unadvertised() if self.watcher is not None else set()
        stored = [entry.release for entry in self.kernels.store.releases()
                  if entry.release not in given and self.kernels.allowed(entry.release)
                  and entry.release not in preparing]
        return (*given, *stored)

    def _release_added(self, release: str) -> None:
        self.log.info("Now serving kernel {release} from the kernel store", release=release)
        for listener in self.on_releases_changed:
            listener()

    def snapshot(self) -> Counters:
        """The counters, with the requests waiting for a slot right now."""
        waiting = self.factory.waiting if self.factory is not None else 0
        return evolve(self.counters, waiting=waiting)

    @property
    def listen_address(self) -> str:
        assert self.port is not None
        return str(getattr(self.port.getHost(), "host", "?"))

    @property
    def port_number(self) -> int:
        assert self.port is not None
        address = self.port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        return address.port

    def startService(self) -> None:
        try:
            self._start()
        except (RootRefused, SandboxUnavailable, SecretError, NotListening,
                AptSetupError) as exc:
            self.log.error("{message}", message=str(exc))
            raise
        except CannotListenError as exc:
            self.log.error("Error setting socket address: {error}", error=exc.socketError)
            raise
        except Exception as exc:
            self.log.failure("Server start failed: {error}", error=exc)
            raise

    def _start(self) -> None:
        refuse_root()
        config = self.config
        user = pwd.getpwuid(os.getuid()).pw_name
        self.log.info("===== compile server pid {pid} starting as {user} =====",
                      pid=os.getpid(), user=user)
        self.identity = load_or_create_identity(config.ssl_dir)
        runtimes = self._select_runtimes()
        self._pool = ThreadPool(minthreads=0, maxthreads=config.concurrency,
                                name="stapsrv-requests")
        original = raise_open_file_limit()
        if original is not None:
            # The translators, make and gcc need no more than they had.
            config = evolve(config, limits=evolve(config.limits, open_files=original))
        cache, keys = self._make_cache()
        if keys is not None:
            self._key_pool = ThreadPool(minthreads=0, maxthreads=KEY_THREADS,
                                        name="stapsrv-keys")
        self.architectures = (debian_architecture(), *config.fetch_architectures)
        kernels = self.kernels = self._make_kernel_fetcher()
        sandbox, stapconf = self._make_sandbox(runtimes)
        handler = RequestHandler(config, self.reactor, self._pool, self._current_identity,
                                 runtimes, cache=cache, keys=keys, counters=self.counters,
                                 sandbox=sandbox, stapconf=stapconf, kernels=kernels,
                                 key_pool=self._key_pool,
                                 toolchains=server_toolchains(config, sandbox, self.log),
                                 user_roots=(server_user_roots(config, self.log)
                                             if sandbox is not None else []),
                                 architectures=self.architectures)
        if kernels is not None and config.fetch_debuginfo:
            handler.releases.module_debug = self._make_module_debug(kernels)
        if self.metrics is not None:
            handler.observer = self.metrics
        handler.on_release_added = self._release_added
        if self._fleet is not None and stapconf is not None:
            handler.warmup.shared = SharedStapconf(self._fleet, log=self.log)
        if kernels is not None and config.prepare_releases:
            self.watcher = self._make_watcher(kernels, handler)
        if self.admission is None:
            self.admission = Admission(self.reactor, config.descriptor_reserve)
        self.factory = CompileServerFactory(handler, self.reactor, self.admission)
        if self.metrics is not None:
            self.factory.on_closed_early.append(self.metrics.closed_early)
        tls_factory = TLSMemoryBIOFactory(
            server_context_factory(self.identity), False, self.factory)
        # TLS is ours, on top of whatever stream the endpoint gives (plain
        # TCP, TCP behind a PROXY header, a socket from systemd).
        self.port = listen_now(self.reactor, config.listen_description, tls_factory,
                               proxy=self._trusted_proxies, gate=self._admission_gate)
        self._pool.start()
        if self._key_pool is not None:
            self._key_pool.start()
        self._log_listening(config)
        Service.startService(self)
        for lists in self._lists:
            lists.start()
        self._trust_self()
        handler.warm_up()

    def _log_listening(self, config: ServerConfig) -> None:
        """Where the server listens, and how it shares its capacity."""
        assert self.admission is not None and self.factory is not None
        self.log.info("Using network address [{address}]:{port}",
                      address=self.listen_address, port=self.port_number)
        if config.proxied:
            self.log.info("Clients' addresses come from the PROXY protocol header "
                          "({endpoint}), believed from {proxies} (--proxy-from)",
                          endpoint=config.listen_description,
                          proxies=", ".join(config.proxy_from))
        self.log.info("Open files limit {limit}: {reserve} descriptors kept for new "
                      "clients, at most {cap} connections per client address",
                      limit=self.admission.descriptors.limit,
                      reserve=self.admission.policy().kept_free,
                      cap=self.factory.per_peer or "unlimited")
        if config.max_threads > 0:
            self.log.info("Using a maximum of {count} threads", count=config.max_threads)
        else:
            self.log.info("Concurrency disabled")

    def _admission_gate(self, stream: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """``stream``, each accepted socket judged by admission first: the
        descriptors left, and (without a proxy) its peer's connections."""
        factory, admission = self.factory, self.admission
        assert factory is not None and admission is not None
        peer_admits = None if self.config.proxied else (
            lambda address: factory.peer_admits(peer_host(address)))
        return AdmissionEndpoint(stream, lambda wrapped: AdmissionFactory(
            wrapped, admission, factory.closed_early, peer_admits, describe=peer_share))

    def _trusted_proxies(self, stream: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """The PROXY protocol reader over ``stream``, for the peers of
        ``--proxy-from`` only."""
        refused = self.metrics.untrusted_proxy if self.metrics is not None else None
        return trusted_proxy_endpoint(stream, parse_networks(self.config.proxy_from,
                                                             "--proxy-from"),
                                      self.log, refused)

    def _make_kernel_fetcher(self) -> KernelFetcher | None:
        """The kernel store and what fetches into it (None: --no-fetch)."""
        config = self.config
        if not config.fetch_kernels:
            self.log.info("Fetching kernel releases that are not installed is off (--no-fetch)")
            return None
        assert self._pool is not None
        store = KernelStore(store_directory(config), config.kernel_store_size)
        for name in [name for part in store.family() for name in part.open()]:
            self.log.info("Kernel store: removed {name}, left by an interrupted fetch",
                          name=name)
        architecture = self.architectures[0]
        releases = [*installed_releases(), *config.releases]
        patterns = config.fetch_patterns or tuple(
            pattern for arch in (architecture, *config.fetch_architectures)
            for pattern in default_patterns(arch, releases))
        apt = None
        if config.fetch_suites:
            apt = PrivateApt(store.directory / APT_DIRECTORY, config.fetch_suites, architecture)
            apt.prepare()
        self.log.info("Kernel store {directory} (at most {size} MiB); fetching releases "
                      "matching {patterns} from {archive}; at most {fetches} fetches at "
                      "once, and kernel store work for {share} at once per client address",
                      directory=store.directory, size=config.kernel_store_size >> 20,
                      patterns=" ".join(patterns) + (
                          " and the kernel series of those suites"
                          if apt is not None and not config.fetch_patterns else ""),
                      archive=(f"the suites {apt.describe()} (apt configuration "
                               f"{apt.config_file})" if apt is not None
                               else "the machine's apt sources"),
                      fetches=config.max_fetches,
                      share=("any number of releases" if config.peer_fetches == 0 else
                             f"{config.peer_fetches} release"
                             + ("s" if config.peer_fetches > 1 else "")))
        fetcher = KernelFetcher(store, self.reactor, self._pool, patterns, log=self.log,
                                apt=apt, foreign=foreign_apts(
                                    store.directory, config.fetch_suites,
                                    config.fetch_architectures))
        self._start_lists(fetcher, patterns)
        self._report_roots(store)
        return fetcher

    def _report_roots(self, store: KernelStore) -> None:
        """Warn when administrators' roots take over half the store's
        ceiling (measured in the pool: a root whose manifest has no size is
        measured once): releases would be removed at every fetch."""
        assert self._pool is not None

        def report(roots: int) -> None:
            if roots * 2 > store.size_cap:
                self.log.warn("Toolchains and user-space roots take {roots} MiB of the kernel "
                              "store's {cap} MiB (--kernel-store-size): little is left for "
                              "releases, which are removed to make room at every fetch; "
                              "raise it", roots=roots >> 20, cap=store.size_cap >> 20)

        Blocking(self.reactor, self._pool)(store.admin_bytes).addCallbacks(
            report, lambda failure: self.log.failure("Cannot measure the store's roots",
                                                     failure))

    def _start_lists(self, fetcher: KernelFetcher, base: tuple[str, ...]) -> None:
        """A lists updater for each private apt of the fetcher; its first
        updates are what fetches wait for."""
        for apt in [*([fetcher.apt] if fetcher.apt is not None else []),
                    *fetcher.foreign.values()]:
            if apt.architecture in fetcher.foreign:
                self.log.info("Kernel store: fetching {architecture} releases from the "
                              "suites {suites} (apt configuration {config})",
                              architecture=apt.architecture, suites=apt.describe(),
                              config=apt.config_file)
            self._lists.append(ListsUpdater(
                apt, fetcher.run, self.reactor,
                partial(self._suites_updated, fetcher, base, apt.architecture),
                log=self.log))
        if self._lists:
            updaters = list(self._lists)

            async def ready() -> None:
                for lists in updaters:
                    await lists.first_update()
            fetcher.ready = ready

    def _suites_updated(self, fetcher: KernelFetcher, base: tuple[str, ...],
                        architecture: str, packages: list[str]) -> None:
        """The suites' lists were updated: their kernel series join the
        fetchable releases (unless --fetch-releases names them); the new
        releases are prepared (--prepare-releases)."""
        self._fetchable(fetcher, base, architecture, packages)
        if self.watcher is not None:
            self.watcher.lists_updated(packages)

    def _fetchable(self, fetcher: KernelFetcher, base: tuple[str, ...],
                   architecture: str, packages: list[str]) -> None:
        if self.config.fetch_patterns:
            return
        self._series[architecture] = series_patterns(packages, architecture)
        patterns = tuple(dict.fromkeys((*base, *(pattern for series in self._series.values()
                                                 for pattern in series))))
        if patterns == fetcher.patterns:
            return
        fetcher.patterns = patterns
        self.log.info("Kernel store: fetching releases matching {patterns}",
                      patterns=" ".join(patterns))
        for listener in self.on_releases_changed:
            listener()

    def _make_watcher(self, kernels: KernelFetcher, handler: RequestHandler
                      ) -> ReleaseWatcher | None:
        """The watcher of the suites' lists (--prepare-releases); None when
        no private apt is updated (the machine's own lists are the admin's)."""
        assert self._pool is not None
        if not self._lists:
            self.log.warn("--prepare-releases needs --fetch-suites (the kernel store's own "
                          "lists, updated by the server); no releases are prepared")
            return None
        preparer = ReleasePreparer(handler.releases, handler.warmup, handler.toolchains,
                                   handler.gate, self.reactor, Blocking(self.reactor, self._pool))
        metrics = self.metrics
        watcher = ReleaseWatcher(
            kernels.store, kernels.allowed, self._has_without_store, preparer.prepare,
            self.reactor, Blocking(self.reactor, self._pool), self._release_added,
            verify=self._verify_prepared if self.config.verify_prepared else None,
            election=self._fleet,
            on_step=metrics.preparation_step if metrics is not None else None, log=self.log)
        self.log.info("Preparing the new releases of the suites' lists before clients ask "
                      "(--prepare-releases){verify}{fleet}",
                      verify=", verified in a VM" if self.config.verify_prepared else "",
                      fleet="; one member of the fleet prepares each"
                      if self._fleet is not None else "")
        return watcher

    def _has_without_store(self, release: str) -> bool:
        return release in self.config.releases or (build_tree(release) / "Makefile").exists()

    async def _verify_prepared(self, release: str) -> str | None:
        """``kernels verify`` of a prepared release against this server, as
        a child process (its VM, its clients); why it failed, or None."""
        assert self.kernels is not None
        host = self.listen_address
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        argv = [sys.executable, "-m", "stapsrv.cli.kernels", "--store",
                str(self.kernels.store.directory),
                *(["--suites", ",".join(f"{suite.name}={suite.uri}"
                                        for suite in self.config.fetch_suites)]
                  if self.config.fetch_suites else []),
                "verify", release, "--server",
                f"[{host}]:{self.port_number}" if ":" in host else f"{host}:{self.port_number}"]
        out, err, code = await run_child(self.reactor, argv, dict(os.environ),
                                         VERIFY_TIMEOUT, None)
        if code == 0:
            return None
        lines = [line for line in (out + err).decode(errors="replace").splitlines()
                 if line.strip()]
        return (lines[-1] if lines else f"exit {code}")[:300]

    def _make_module_debug(self, kernels: KernelFetcher) -> ModuleDebug:
        """Module debuginfo on demand (--fetch-debuginfo), beside the kernel store."""
        module_debug = ModuleDebug(kernels, log=self.log)
        for name in module_debug.open():
            self.log.info("Kernel store: removed {name}, left by an interrupted fetch of "
                          "module debuginfo", name=name)
        return module_debug

    def _make_sandbox(self, runtimes: Mapping[str, str]
                      ) -> tuple[Sandbox | None, StapconfStore | None]:
        """The translators' sandbox, checked to work here; refuses to start
        when it cannot run, unless the admin accepted that (--no-sandbox)."""
        if not self.config.sandbox:
            self.log.warn("Translator sandbox disabled (--no-sandbox): compiles can read "
                          "everything this server's user can, as with stap-serverd 4.8")
            return None, None
        sandbox = server_sandbox(self.config, os.environ, runtimes)
        try:
            sandbox.check()
        except SandboxUnavailable as exc:
            raise SandboxUnavailable(
                f"The translator sandbox cannot run here: {exc}.  It needs bubblewrap "
                "(Debian package bubblewrap) and unprivileged user namespaces.  To run "
                "without it, as stap-serverd 4.8 does (every client's compile can then read "
                "all that this server's user can, its private key included), start with "
                "--no-sandbox.") from exc
        stapconf = StapconfStore(
            (self.config.runtime_cache or default_cache_root()) / "stapconf")
        self.log.info("Translators run in a bubblewrap sandbox ({bwrap})", bwrap=sandbox.bwrap)
        return sandbox, stapconf

    def _make_cache(self) -> tuple[ResponseCache | None, KeyMaker | None]:
        config = self.config
        if not config.cache_enabled:
            self.log.info("Response cache disabled")
            return None, None
        assert self._pool is not None
        cache: ResponseCache = DiskCache(config.response_cache_dir, config.cache_size,
                                         self.reactor, self._pool, self.log)
        self.log.info("Response cache {directory} (at most {size} MiB)",
                      directory=config.response_cache_dir, size=config.cache_size >> 20)
        if config.fleet_cache:
            assert config.fleet_secret is not None  # server_config sees to it
            fleet = RedisCache(config.fleet_cache, self.reactor, log=self.log,
                               secret=load_secret(config.fleet_secret),
                               password=load_password(config.fleet_password_file))
            self._fleet = fleet
            cache = TieredCache(cache, fleet)
            self.log.info("Fleet cache {url} (entries authenticated with the secret in "
                          "{secret})", url=fleet.display_url, secret=config.fleet_secret)
        keys = KeyMaker(stap=config.stap, modules_root=MODULES,
                        environ=dict(os.environ), rc_file=systemtap_dir() / "rc")
        return cache, keys

    def _current_identity(self) -> ServerIdentity:
        assert self.identity is not None
        return self.identity

    def _select_runtimes(self) -> dict[str, str]:
        if self.config.runtime is not None:
            return {}
        runtimes = {}
        for release in self.config.releases:
            try:
                fixed = select_runtime(build_tree(release), cache_root=self.config.runtime_cache)
            except (OSError, RuntimeError) as exc:
                self.log.warn("Cannot prepare a fixed runtime for {release}: {error}",
                              release=release, error=exc)
                continue
            if fixed is not None:
                self.log.info("Using the fixed runtime {runtime} for kernel {release}",
                              runtime=fixed, release=release)
                runtimes[release] = str(fixed)
        return runtimes

    def _trust_self(self) -> None:
        """Let this server's own user trust it, as 4.8 does on every start."""
        assert self._pool is not None
        cert = self.config.ssl_dir / "stap.cert"
        database = local_client_db_dir()
        d = deferToThreadPool(self.reactor, self._pool, trust_certificate, cert, database)
        d.addErrback(lambda failure: self.log.warn(
            "Unable to authorize certificate for the local client: {error}",
            error=failure.getErrorMessage()))

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for lists in self._lists:
            lists.stop()
        if self.factory is not None and self.factory.handler.keys is not None:
            # Keys being computed give up now (those answers are not cached).
            self.factory.handler.keys.digests.stop()
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
            self.port = None
        if self.factory is not None:
            await self.factory.drain(self.reactor, SHUTDOWN_GRACE)
            # Requests forced out by the drain may leave translators ending.
            await self.factory.handler.stop_translators()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if self._key_pool is not None:
            self._key_pool.stop()
            self._key_pool = None
        if self._fleet is not None:
            self._fleet.close()
            self._fleet = None
        if self.admission is not None:
            # What was closed since the last line, said now (no timer left).
            self.admission.report.flush()
