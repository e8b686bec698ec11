"""Target architectures (sans-IO): which one a request asks for, which
one a Debian kernel release is built for, and what the translator needs
to build for an architecture other than the server's own.

Three namings meet here.  Debian names architectures ``amd64`` and
``arm64`` (its kernel flavours end with them: ``6.1.0-41-arm64``); the
translator names them as ``uname -m`` after its own normalisation
(``x86_64``, ``arm64``): that is what a client writes after its release in
``sysinfo`` and what ``-a`` takes; the cross compilers are GNU triplets
(``aarch64-linux-gnu-``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from attrs import frozen

#: Debian architecture -> the translator's name for it (sysinfo, ``-a``).
TRANSLATOR_NAMES = {"amd64": "x86_64", "arm64": "arm64", "i386": "i386",
                    "armhf": "arm", "ppc64el": "powerpc", "s390x": "s390"}
#: Debian architecture -> the prefix of its cross tools (``CROSS_COMPILE``),
#: for the architectures a server may build for besides its own.
CROSS_PREFIXES = {"amd64": "x86_64-linux-gnu-", "arm64": "aarch64-linux-gnu-"}
#: Debian architecture -> the Debian package of its cross compiler.
CROSS_PACKAGES = {"amd64": "gcc-x86-64-linux-gnu", "arm64": "gcc-aarch64-linux-gnu"}

_FLAVOUR = re.compile(r".*-([a-z0-9]+)")


class ArchitectureError(ValueError):
    """A word that names no architecture this server can build for."""


def parse_architectures(values: Iterable[str]) -> tuple[str, ...]:
    """Debian architecture names (separated by commas or blanks), each
    once; raises :class:`ArchitectureError` for one no cross compiler is
    known for."""
    found: list[str] = []
    for value in values:
        for word in re.split(r"[\s,]+", value):
            if not word:
                continue
            if word not in CROSS_PREFIXES:
                raise ArchitectureError(
                    f"Not an architecture this server can build for: {word!r} "
                    f"(Debian names: {', '.join(sorted(CROSS_PREFIXES))})")
            if word not in found:
                found.append(word)
    return tuple(found)


def release_architecture(release: str) -> str | None:
    """The Debian architecture a Debian kernel release names by its
    flavour (``6.1.0-41-arm64``, ``6.1.0-41-cloud-amd64``: ``arm64``,
    ``amd64``); None for a release that names none known."""
    match = _FLAVOUR.fullmatch(release)
    if match is None or match.group(1) not in TRANSLATOR_NAMES:
        return None
    return match.group(1)


def debian_name(translator_name: str) -> str | None:
    """``x86_64`` -> ``amd64``; None when unknown."""
    for debian, name in TRANSLATOR_NAMES.items():
        if name == translator_name:
            return debian
    return None


@frozen
class Target:
    """The architecture a request is built for (Debian's name), or why it
    is refused (one line for the client)."""

    architecture: str | None
    refusal: str | None = None


def request_target(sysinfo_arch: str | None, dash_a: Sequence[str], release: str | None,
                   host: str, served: Sequence[str]) -> Target:
    """The architecture of a request whose ``sysinfo`` names
    ``sysinfo_arch``, whose arguments give ``dash_a`` (the ``-a`` values),
    for kernel ``release``, on a server of Debian architecture ``host``
    that builds for ``served`` (its own included)."""
    named = sysinfo_arch or TRANSLATOR_NAMES.get(host, host)
    for value in dash_a:
        if value != named:
            return Target(None, f"Server: The request is for architecture '{named}' "
                          f"(its sysinfo) but its -a names '{value}'; they must agree.")
    wanted = debian_name(named)
    kernel = release_architecture(release) if release is not None else None
    if kernel is not None and wanted is not None and kernel != wanted:
        return Target(None, f"Server: Kernel release '{release}' is an {kernel} kernel "
                      f"but the request is for architecture '{named}'; give stap "
                      f"-a {TRANSLATOR_NAMES[kernel]} for it.")
    if wanted is None or wanted not in served:
        names = ", ".join(TRANSLATOR_NAMES.get(arch, arch) for arch in served)
        return Target(None, f"Server: This server does not build modules for "
                      f"architecture '{named}'; it builds for: {names}.")
    return Target(wanted)


def advertised_architecture(release: str, default: str, host: str,
                            cross: Sequence[str]) -> str | None:
    """What a server advertises after a stored ``release`` in its Avahi
    ``sysinfo`` (the translator's name, as a client of that architecture
    writes it): ``default`` (the server's ``-a`` or its own) unless the
    release is a kernel of another architecture; that one's name when the
    server builds for it (``cross``, Debian names, its ``host`` excluded);
    None for a release no client could be served for here."""
    kernel = release_architecture(release)
    if kernel is None or kernel == host or TRANSLATOR_NAMES[kernel] == default:
        return default
    if kernel in cross:
        return TRANSLATOR_NAMES[kernel]
    return None


def cross_options(architecture: str, host: str) -> list[tuple[str, str]]:
    """The translator's ``-a`` and ``-B CROSS_COMPILE=`` for
    ``architecture`` on a ``host`` server (none for its own)."""
    if architecture == host:
        return []
    return [("-a", TRANSLATOR_NAMES[architecture]),
            ("-B", f"CROSS_COMPILE={CROSS_PREFIXES[architecture]}")]
