"""A compile server's settings, as one frozen value."""

from __future__ import annotations

import os
from pathlib import Path

from attrs import field, frozen

from stapsrv.cmdline import ServerOption

#: 4.8's request limits, in bytes.
DEFAULT_MAX_REQUEST_SIZE = 50000
DEFAULT_MAX_COMPRESSED_REQUEST = 5000


def default_stap() -> str:
    return os.environ.get("SYSTEMTAP_STAP", "/usr/bin/stap")


def default_listen() -> str:
    """``STAPSRV_LISTEN`` (an address) or every address, as 4.8 always did."""
    return os.environ.get("STAPSRV_LISTEN") or "::"


def default_tmpdir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


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

    @property
    def concurrency(self) -> int:
        """Requests processed at once: ``--max-threads 0`` means one."""
        return max(1, self.max_threads)
