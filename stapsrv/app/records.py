"""What a server advertises over mDNS, as stap-serverd 4.8 does: one
``_stap._tcp`` service per kernel release, all with the same base name
(Avahi renames the second and later ones ``… #2``, ``#3``), TXT
``sysinfo``, ``optinfo``, ``version``, ``certinfo`` (and ``mok_info``) in
that wire order."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence

from stapsrv import PROTOCOL_VERSION
from stapsrv.app.interfaces import ServiceRecord
from stapsrv.app.service import CompileServerService
from stapsrv.core.architectures import advertised_architecture, debian_name
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
                    serial: str, moks: Sequence[str] = (),
                    architectures: Mapping[str, str] | None = None) -> list[ServiceRecord]:
    """What a server publishes: one record per release, TXT in 4.8's order,
    ``mok_info`` entries last (the 4.8 client reads everything after the
    first ``mok_info`` as MOK fingerprints).  ``sysinfo`` names ``arch``
    (default: this machine's) after each release, or the architecture
    ``architectures`` gives for it (a stored kernel of another one)."""
    arch = arch or translator_architecture(os.uname().machine)
    options = optinfo(server_options)
    name = service_name(hostname)
    named = architectures or {}
    return [ServiceRecord(name, port, (
        f"sysinfo={release} {named.get(release, arch)}".encode(),
        f"optinfo={options}".encode(),
        f"version={PROTOCOL_VERSION}".encode(),
        f"certinfo={serial}".encode(),
        *(f"mok_info={value}".encode() for value in moks),
    )) for release in releases]


def served_architectures(releases: Sequence[str], given: Sequence[str], default: str,
                         host: str, cross: Sequence[str]) -> dict[str, str]:
    """The ``sysinfo`` architecture of each release a server advertises:
    ``default`` for those it was given (as 4.8 does), each stored one's
    own (:func:`advertised_architecture`); a stored release of an
    architecture the server does not build for is left out."""
    found = {}
    for release in releases:
        arch = default if release in given else advertised_architecture(
            release, default, host, cross)
        if arch is not None:
            found[release] = arch
    return found


def records_for(server: CompileServerService) -> Callable[[], list[ServiceRecord]]:
    """The records of a started ``CompileServerService``."""
    def records() -> list[ServiceRecord]:
        config = server.config
        assert server.identity is not None
        default = config.arch or translator_architecture(os.uname().machine)
        host = (server.architectures[0] if server.architectures
                else debian_name(translator_architecture(os.uname().machine)) or "")
        architectures = served_architectures(
            server.served_releases(), config.releases, default, host,
            config.fetch_architectures)
        return service_records(socket.gethostname(), list(architectures), default,
                               config.server_options, server.port_number,
                               server.identity.serial_text,
                               mok.advertised_fingerprints(config.moks()), architectures)
    return records
