"""What a server advertises over mDNS, as stap-serverd 4.8 does: one
``_stap._tcp`` service per kernel release, all with the same base name
(Avahi renames the second and later ones ``… #2``, ``#3``), TXT
``sysinfo``, ``optinfo``, ``version``, ``certinfo`` (and ``mok_info``) in
that wire order."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable, Iterable, Sequence

from stapsrv import PROTOCOL_VERSION
from stapsrv.app.interfaces import ServiceRecord
from stapsrv.app.service import CompileServerService
from stapsrv.core.cmdline import ServerOption
from stapsrv.identity import mok
from stapsrv.paths import translator_architecture

SERVICE_TYPE = "_stap._tcp"
NAME_PREFIX = "Systemtap Compile Server on "
#: ``AVAHI_LABEL_MAX - 1``: the longest valid service name, in bytes.
MAX_NAME_BYTES = 63


def service_name(hostname: str) -> str:
    """The base service name, cut to 63 bytes as 4.8 does."""
    name = (NAME_PREFIX + hostname).encode()[:MAX_NAME_BYTES]
    return name.decode(errors="ignore")


def optinfo(server_options: Iterable[ServerOption]) -> str:
    """The server's -R, -B, -D and -I options, grouped in that order, glued."""
    options = list(server_options)
    words = []
    for flag in ("-R", "-B", "-D", "-I"):
        words += [flag + shlex.quote(o.value) for o in options if o.flag == flag]
    return " ".join(words)


def service_records(hostname: str, releases: Sequence[str], arch: str | None,
                    server_options: Iterable[ServerOption], port: int,
                    serial: str, moks: Sequence[str] = ()) -> list[ServiceRecord]:
    """What a server publishes: one record per release, TXT in 4.8's order,
    ``mok_info`` entries last (the 4.8 client reads everything after the
    first ``mok_info`` as MOK fingerprints)."""
    arch = arch or translator_architecture(os.uname().machine)
    options = optinfo(server_options)
    name = service_name(hostname)
    return [ServiceRecord(name, port, (
        f"sysinfo={release} {arch}".encode(),
        f"optinfo={options}".encode(),
        f"version={PROTOCOL_VERSION}".encode(),
        f"certinfo={serial}".encode(),
        *(f"mok_info={value}".encode() for value in moks),
    )) for release in releases]


def records_for(server: CompileServerService) -> Callable[[], list[ServiceRecord]]:
    """The records of a started ``CompileServerService``."""
    def records() -> list[ServiceRecord]:
        config = server.config
        assert server.identity is not None
        return service_records(socket.gethostname(), server.served_releases(), config.arch,
                               config.server_options, server.port_number,
                               server.identity.serial_text,
                               mok.advertised_fingerprints(config.moks()))
    return records
