"""Facts about the host that several layers need, each stated once.

Where a user's SystemTap files live (``$SYSTEMTAP_DIR``, else
``~/.systemtap``), where kernel build trees are (``/lib/modules``), what
SystemTap calls the host's architecture, and the refusal to run a server
as root.
"""

from __future__ import annotations

import os
import platform
import pwd
import re
from collections.abc import Mapping
from pathlib import Path

# --- the user's SystemTap directory -----------------------------------------


def home_directory(environ: Mapping[str, str] = os.environ) -> Path:
    """``$HOME``, else the passwd entry's home directory (as 4.8 does)."""
    home = environ.get("HOME")
    if home:
        return Path(home)
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def systemtap_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$SYSTEMTAP_DIR`` if set (and not empty), else ``~/.systemtap``."""
    configured = environ.get("SYSTEMTAP_DIR")
    if configured:
        return Path(configured)
    return home_directory(environ) / ".systemtap"


def local_client_db_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The user's SSL client trust database (``.../ssl/client``)."""
    return systemtap_dir(environ) / "ssl" / "client"


def default_server_ssl_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """A server's own key and certificate directory (``.../ssl/server``)."""
    return systemtap_dir(environ) / "ssl" / "server"


def default_mok_store(environ: Mapping[str, str] = os.environ) -> Path:
    """4.8 keeps MOKs beside the default certificate database (``--ssl``
    does not move them)."""
    return default_server_ssl_dir(environ) / "moks"


# --- kernel build trees -------------------------------------------------------

#: Where kernel releases and their build trees are installed.
MODULES = Path("/lib/modules")


def build_tree(release: str, modules: Path = MODULES) -> Path:
    """The build tree of an installed kernel release."""
    return modules / release / "build"


def installed_releases(modules: Path = MODULES) -> list[str]:
    """Releases with a kernel build tree, oldest first."""
    def key(release: str) -> list[object]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", release)]
    found = [path.name for path in modules.glob("*")
             if (build_tree(path.name, modules) / "Makefile").exists()]
    return sorted(found, key=key)


# --- architecture names ---------------------------------------------------------

#: ``uname -m`` patterns and stap's names for them, as the translator and
#: stap-serverd 4.8 have them (``util.cxx: normalize_machine``).
_TRANSLATOR_ARCHITECTURES = (
    (r"i[456]86", "i386"), (r"sun4u", "sparc64"), (r"arm.*|sa110", "arm"),
    (r"s390x", "s390"), (r"aarch64", "arm64"), (r"ppc.*", "powerpc"),
    (r"mips.*", "mips"), (r"sh[234].*", "sh"),
)
#: The same as the 4.8 ``stap-server`` script writes them, a little wider:
#: ``sa1*``, ``s390*``, ``i?86`` and ``sh?`` (so ``sa1100`` and ``sh5`` are
#: ``arm`` and ``sh`` here, unchanged for the translator).
_MANAGER_ARCHITECTURES = (
    (r"i.86", "i386"), (r"sun4u", "sparc64"), (r"(arm|sa1).*", "arm"),
    (r"s390.*", "s390"), (r"aarch64.*", "arm64"), (r"ppc.*", "powerpc"),
    (r"mips.*", "mips"), (r"sh.", "sh"),
)


def _architecture(machine: str | None, rules: tuple[tuple[str, str], ...]) -> str:
    machine = machine or platform.machine()
    for pattern, name in rules:
        if re.fullmatch(pattern, machine):
            return name
    return machine


def translator_architecture(machine: str | None = None) -> str:
    """What stap calls ``machine`` (default: this host's ``uname -m``); the
    architecture a server publishes when it is given no ``-a``."""
    return _architecture(machine, _TRANSLATOR_ARCHITECTURES)


def manager_architecture(machine: str | None = None) -> str:
    """The architecture ``stap-server`` gives a server it starts (``-a``)."""
    return _architecture(machine, _MANAGER_ARCHITECTURES)


# --- never as root ------------------------------------------------------------

#: Set to any value to let a server run as root (the upstream testsuite's
#: escape hatch, kept under its upstream name).
ROOT_OVERRIDE = "STAP_PR11197_OVERRIDE"
ROOT_REFUSAL = "For security reasons, invocation of stap-serverd as root is not supported."


class RootRefused(Exception):
    """A server was to run as root without ``ROOT_OVERRIDE``."""


def root_refused(uid: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a server may not run as ``uid``."""
    return uid == 0 and ROOT_OVERRIDE not in environ


def refuse_root(environ: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`RootRefused` when this process may not be a server."""
    if root_refused(os.geteuid(), environ):
        raise RootRefused(ROOT_REFUSAL)
