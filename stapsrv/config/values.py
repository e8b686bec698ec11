"""A compile server's settings, as one frozen value."""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

from attrs import field, frozen

from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, proxied, shorthand
from stapsrv.core.aptsources import AptSuite  # --fetch-suites (#27)
from stapsrv.core.cmdline import ALL_PRIVILEGES, ServerOption
from stapsrv.paths import default_mok_store, systemtap_dir

#: 4.8's request limits, in bytes.
DEFAULT_MAX_REQUEST_SIZE = 50000
DEFAULT_MAX_COMPRESSED_REQUEST = 5000

#: Seconds a client has for its TLS handshake and upload (and again for
#: taking its answer).  4.8 had no limit: a silent client held a thread.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Seconds the translator may run for one request.  Generous: a cold build
#: of a large script on a slow machine takes minutes.
DEFAULT_COMPILE_TIMEOUT = 900.0
#: Address space of the translator and of each process it starts (its
#: ``--memory-limit``).  Measured during cold -p4 compiles of typical
#: scripts here: stap peaks at 107 MiB of address space (98 MiB resident),
#: cc1 at 149 MiB (120 MiB); kernel debuginfo can take stap past 1 GiB.  A
#: macro bomb grows without bound and meets this limit.
DEFAULT_ADDRESS_SPACE = 4 << 30
#: Bytes of each of the translator's output streams (stdout, stderr) sent to
#: the client; a translator that writes more is stopped.  Real compiles
#: write kilobytes (``-v`` listings a few hundred); bombs write hundreds of
#: megabytes.
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
#: Connections the kernel queues for the server before it accepts them
#: (4.8 used 50, which makes bursts of clients retry their SYNs).
DEFAULT_LISTEN_BACKLOG = 1024
#: Descriptors kept free for new clients (``--descriptor-reserve``): when
#: fewer are free, the connections waiting longest without a request are
#: closed (:mod:`stapsrv.core.admission`).
DEFAULT_DESCRIPTOR_RESERVE = 128
#: Bytes of compiled answers kept on disk for repeated requests.
DEFAULT_CACHE_SIZE = 512 * 1024 * 1024
#: Bytes of kernel build trees kept in the kernel store (about 90 MB each).
#: Room for about 24 releases beside a toolchain and a user-space root
#: (about 1.3 GB together), which count under the same ceiling.
DEFAULT_KERNEL_STORE_SIZE = 4096 * 1024 * 1024
#: Kernel store fetches (a release, its symbols, debuginfo, module
#: debuginfo passes) run at once, for all clients together.
DEFAULT_MAX_FETCHES = 2
#: Kernel releases one client address may have kernel store work (those,
#: and a release's warm-up compile) under way for at once.
DEFAULT_PEER_FETCHES = 1


def default_stap() -> str:
    return os.environ.get("SYSTEMTAP_STAP", "/usr/bin/stap")


def default_listen() -> str:
    """``STAPSRV_LISTEN`` (an address) or every address, as 4.8 always did."""
    return os.environ.get("STAPSRV_LISTEN") or "::"


def default_tmpdir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


@frozen
class TranslatorLimits:
    """Resource limits set on the translator before it starts (``None``: not
    set, so the server's own limits and ``~/.systemtap/rc`` apply).  They are
    inherited by everything the translator runs (make, gcc, ld)."""

    cpu_seconds: int | None = None
    address_space: int | None = DEFAULT_ADDRESS_SPACE
    file_size: int | None = None
    processes: int | None = None
    #: The descriptor limit (soft, hard) the server had before it raised
    #: its own soft one for idle connections: the translator gets it back.
    open_files: tuple[int, int] | None = None
    #: How much lower its CPU priority is than the server's (``nice -n``).
    niceness: int = 0

    def prlimit_flags(self) -> list[str]:
        """``prlimit(1)`` options setting each limit, soft and hard."""
        words = []
        for name, value in (("cpu", self.cpu_seconds), ("as", self.address_space),
                            ("fsize", self.file_size), ("nproc", self.processes)):
            if value is not None:
                words.append(f"--{name}={value}:{value}")
        if self.open_files is not None:
            soft, hard = (_rlimit_word(value) for value in self.open_files)
            words.append(f"--nofile={soft}:{hard}")
        return words


def _rlimit_word(value: int) -> str:
    """A limit as prlimit(1) takes it."""
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


@frozen
class ServerConfig:
    """Everything one compile server (one listening port) needs to know.

    ``releases`` are the kernel releases served, in the order given, with the
    running kernel's release included as 4.8 does.  ``server_options`` are
    the ``-a/-B/-D/-I/-R`` options passed to every translator, in the order
    given.  ``runtime`` is the explicit ``-R`` (also in ``server_options``);
    without one, a fixed copy of the stock runtime is used for releases
    whose headers the stock runtime cannot build against.
    """

    releases: tuple[str, ...]
    ssl_dir: Path
    server_options: tuple[ServerOption, ...] = ()
    arch: str | None = None
    runtime: str | None = None
    port: int = 0
    listen: str = field(factory=default_listen)
    log_file: Path | None = None
    max_threads: int = field(factory=lambda: os.cpu_count() or 1)
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    max_compressed_request: int = DEFAULT_MAX_COMPRESSED_REQUEST
    keep_temporary: bool = False
    stap: str = field(factory=default_stap)
    tmpdir: Path = field(factory=default_tmpdir)
    runtime_cache: Path | None = None
    #: Events of this server carry this namespace, so that a process running
    #: several servers can route each one's lines to its own log file.
    log_namespace: str = "stapsrv"
    #: The MOK store (None: ``moks/`` beside the default certificate directory).
    mok_store: Path | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT
    limits: TranslatorLimits = TranslatorLimits()
    max_output: int = DEFAULT_MAX_OUTPUT
    listen_backlog: int = DEFAULT_LISTEN_BACKLOG
    #: Connections one peer address may hold at once (None: an eighth of
    #: the descriptor limit, at most 1024; 0: no cap), and descriptors kept free for new
    #: clients.
    max_peer_connections: int | None = None
    descriptor_reserve: int = DEFAULT_DESCRIPTOR_RESERVE
    #: Answers to repeated requests are kept in ``cache_dir`` (None: the
    #: default under the server's state directory) up to ``cache_size`` bytes.
    cache_enabled: bool = True
    cache_dir: Path | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    #: ``redis://`` URL of a cache shared by a fleet of servers, or None; its
    #: entries are sealed under the secret in ``fleet_secret``, and the
    #: Redis password is read from ``fleet_password_file`` (None:
    #: ``$STAPSRV_FLEET_PASSWORD``, else none).
    fleet_cache: str | None = None
    fleet_secret: Path | None = None
    fleet_password_file: Path | None = None
    #: Where the server keeps its request counters for ``stap-server status``.
    counters_file: Path | None = None
    #: Every translator runs in a bubblewrap sandbox (``--no-sandbox``: as
    #: 4.8, with everything the server user can read).
    sandbox: bool = True
    #: Client policy: the networks that may connect (none given: all),
    #: whether guru mode is refused, the privilege levels compiled for.
    allow: tuple[str, ...] = ()
    refuse_guru: bool = False
    privileges: tuple[str, ...] = ALL_PRIVILEGES
    #: A Twisted server endpoint description to listen on instead of
    #: ``listen``/``port`` (``haproxy:tcp:...``, ``systemd:...``).
    endpoint: str | None = None
    #: Behind a ``haproxy:`` endpoint, the addresses or CIDR networks whose
    #: connections may carry the PROXY header; any other peer is closed
    #: unread (``--proxy-from``; default: loopback).
    proxy_from: tuple[str, ...] = DEFAULT_PROXY_FROM
    #: Where to serve Prometheus metrics and ``/healthz`` (an endpoint
    #: description), or None for no metrics listener.
    metrics: str | None = None

    @property
    def listen_description(self) -> str:
        """The endpoint the server listens on: ``endpoint``, or the
        ``tcp:`` shorthand of ``listen`` and ``port``."""
        return self.endpoint or shorthand(self.port, self.listen, self.listen_backlog)

    @property
    def proxied(self) -> bool:
        """Clients come through a proxy that sends the PROXY protocol header."""
        return proxied(self.listen_description)
    #: Releases that are not installed are fetched from the Debian archive
    #: into the kernel store (``kernel_store``, None: the default under the
    #: server's cache directory), when they match ``fetch_patterns`` (empty:
    #: the flavours of the server's own kernel series and architecture).
    fetch_kernels: bool = True
    fetch_patterns: tuple[str, ...] = ()
    #: The Debian suites releases are fetched from, through the kernel
    #: store's private apt configuration (empty: the machine's own apt
    #: sources and kernel series).  # --fetch-suites (#27)
    fetch_suites: tuple[AptSuite, ...] = ()
    #: Debian architectures besides the server's own whose releases are
    #: fetched and whose modules are cross-built.  # --fetch-architectures (#30)
    fetch_architectures: tuple[str, ...] = ()
    kernel_store: Path | None = None
    kernel_store_size: int = DEFAULT_KERNEL_STORE_SIZE
    #: Make every served release's System.map from its kernel image (a
    #: local ``/boot/vmlinuz-<release>``, else ``linux-image-<release>``);
    #: with ``fetch_debuginfo``, fetch the map and the kernel's debuginfo
    #: (``vmlinux``) from ``linux-image-<release>-dbg`` instead.
    fetch_symbols: bool = True
    fetch_debuginfo: bool = False
    #: Fetches the kernel store runs at once (``--max-fetches``; more wait,
    #: each client address in turn), and the kernel releases one client
    #: address may have kernel store work under way for (``--peer-fetches``;
    #: 0: no cap), past which its client is told so on a ``Server:`` line.
    max_fetches: int = DEFAULT_MAX_FETCHES
    peer_fetches: int = DEFAULT_PEER_FETCHES
    #: Prepare the releases that appear in the suites' lists before any
    #: client asks for them, and verify them in a VM first.  # (#29)
    prepare_releases: bool = False
    verify_prepared: bool = False

    @property
    def response_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return systemtap_dir() / "stapsrv-cache"

    def moks(self, environ: Mapping[str, str] = os.environ) -> Path:
        """The MOK store: ``mok_store``, else the default beside the
        default certificate directory of ``environ``'s user."""
        return self.mok_store or default_mok_store(environ)

    @property
    def concurrency(self) -> int:
        """Requests processed at once: ``--max-threads 0`` means one."""
        return max(1, self.max_threads)
