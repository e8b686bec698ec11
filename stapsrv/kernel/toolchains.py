"""Toolchains: a translator with its runtime and tapsets, and the compilers
it may call.

The host's (``/usr/bin/stap`` with the server's fixed runtime, the host's
gcc) is always one.  Others are roots made from a Debian suite with
``debootstrap`` by the admin command :mod:`stapsrv.cli.toolchains`, kept
in the kernel store at ``STORE/.toolchains/<name>/``: ``root/`` (the
debootstrapped system, owned by root, only read by the server) and
``manifest.json`` (the suite, when it was made, and the version of every
package in the root).  A translator of such a root runs in the sandbox
with that root's ``/usr`` as its system (:mod:`stapsrv.compile.sandbox`).

Which toolchain answers a request (:func:`choose`) follows from three
facts: the *transport family* of the client's ``staprun`` (4.x's and
5.x's each refuse modules built by the other's translator, observed in
the VM), the newest kernel a translator builds for, and the compiler the
kernel's headers call (read from them), which the toolchain must have.

Blocking file reads only (no processes): call from a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from attrs import frozen

from stapsrv.core.members import version_key

T = TypeVar("T")

#: Where toolchains are, inside the kernel store's directory.
TOOLCHAINS_DIRECTORY = ".toolchains"
MANIFEST = "manifest.json"
ROOT = "root"
#: The host's toolchain: the machine's own translator and compilers.
HOST = "host"
#: What a toolchain's name may be (it is a directory name).
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")

#: The newest kernel (major, minor) a translator version builds for, where
#: one is known: 4.8's runtime, even with the server's fix, does not build
#: for 6.12 (``mmap_sem``, ``get_user_pages_remote``; issue 27).  Versions
#: not listed have no known bound.
NEWEST_KERNEL: dict[tuple[int, int], tuple[int, int]] = {(4, 8): (6, 1)}

_CC_LINE = re.compile(r"^\s*CC\s*:?=\s*(.*)$", re.M)
_CC_TEXT = re.compile(r'^CONFIG_CC_VERSION_TEXT="([^" ]+)', re.M)
_INCLUDE = re.compile(r"^\s*-?include\s+(\S+)/Makefile\s*$", re.M)
_KERNEL_VERSION = re.compile(r"(\d+)\.(\d+)")


class DamagedToolchain(Exception):
    """A toolchain's root cannot serve: the message says what is wrong."""


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name != HOST


def toolchains_directory(store: Path) -> Path:
    """Where the toolchains of the kernel store ``store`` are."""
    return store / TOOLCHAINS_DIRECTORY


def family(version: str) -> int:
    """The transport family of a SystemTap version: its major number (4.x
    and older speak 4.8's module transport; 5.x speak another)."""
    return max(4, version_key(version)[0]) if version else 4


@frozen
class Toolchain:
    """One toolchain, as the server uses it."""

    name: str
    #: Its system: ``/`` for the host's.
    root: Path
    #: The translator's version (``4.8``, ``5.6``).
    translator: str
    #: Package name and version of everything in the root.
    packages: tuple[tuple[str, str], ...] = ()
    #: A digest of the manifest (empty for the host's): part of cache keys.
    digest: str = ""
    suite: str = ""

    @property
    def is_host(self) -> bool:
        return self.name == HOST

    @property
    def family(self) -> int:
        return family(self.translator)

    @property
    def newest_kernel(self) -> tuple[int, int] | None:
        number = (*version_key(self.translator), 0, 0)
        return NEWEST_KERNEL.get((number[0], number[1]))

    @property
    def stap(self) -> str:
        """The translator's path inside its sandbox."""
        return "/usr/bin/stap"

    def has_compiler(self, compiler: str) -> bool:
        """Whether its system has ``compiler`` (a program name) in /usr/bin."""
        return "/" not in compiler and (self.root / "usr" / "bin" / compiler).exists()

    def has_cross_compiler(self, prefix: str) -> bool:
        """Whether its system has a C compiler with ``prefix``
        (``aarch64-linux-gnu-``) of any version, in /usr/bin."""
        try:
            return any(entry.name.startswith(f"{prefix}gcc")
                       for entry in (self.root / "usr" / "bin").iterdir())
        except OSError:
            return False

    def describe(self) -> str:
        return f"{self.name} (SystemTap {self.translator})"

    def label(self) -> str:
        """What the cache key and the log name it by."""
        return f"{self.name} {self.translator} {self.digest}".strip()


def host_toolchain(translator: str) -> Toolchain:
    return Toolchain(HOST, Path("/"), translator)


def installed_packages(admindir: Path) -> dict[str, str]:
    """Installed packages and their versions, from dpkg's ``status`` file."""
    found: dict[str, str] = {}
    try:
        text = (admindir / "status").read_text(errors="replace")
    except OSError:
        return found
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            name = fields["Package"]
            if fields.get("Architecture") not in (None, "all", "amd64") and ":" not in name:
                name = f"{name}:{fields['Architecture']}"
            found[name] = fields.get("Version", "")
    return found


def upstream_version(debian_version: str) -> str:
    """``5.6`` from ``5.6-1`` (epoch and Debian revision dropped)."""
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def manifest_text(name: str, suite: str, made: float, packages: dict[str, str],
                  size: int | None = None) -> str:
    """A root's manifest (``size``: its files' bytes, which the kernel
    store's ceiling counts)."""
    return json.dumps({"name": name, "suite": suite, "made": made,
                       **({"size": size} if size is not None else {}),
                       "packages": dict(sorted(packages.items()))}, indent=1) + "\n"


def load(directory: Path) -> Toolchain:
    """The toolchain kept in ``directory``; raises :class:`DamagedToolchain`
    (with what is wrong) when its manifest or root cannot serve."""
    name = directory.name
    try:
        raw = (directory / MANIFEST).read_bytes()
        manifest = json.loads(raw)
        packages = {str(key): str(value) for key, value in manifest["packages"].items()}
        suite = str(manifest["suite"])
    except OSError as exc:
        raise DamagedToolchain(f"toolchain {name}: no manifest ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedToolchain(f"toolchain {name}: its manifest {directory / MANIFEST} "
                               f"cannot be read ({exc!r})") from exc
    root = directory / ROOT
    if "systemtap" not in packages:
        raise DamagedToolchain(f"toolchain {name}: its manifest names no systemtap package")
    for program in ("usr/bin/stap", "usr/bin/make"):
        if not os.access(root / program, os.X_OK):
            raise DamagedToolchain(f"toolchain {name}: {root / program} is missing; make it "
                                   f"again (python -m stapsrv.cli.toolchains update {name})")
    if not (root / "usr" / "share" / "systemtap" / "runtime").is_dir():
        raise DamagedToolchain(f"toolchain {name}: its root has no SystemTap runtime")
    return Toolchain(name, root, upstream_version(packages["systemtap"]),
                     tuple(sorted(packages.items())),
                     hashlib.sha256(raw).hexdigest()[:16], suite)


def discover(store: Path) -> tuple[list[Toolchain], list[str]]:
    """The toolchains kept in the kernel store ``store`` (by name), and one
    line per damaged one."""
    return discover_in(toolchains_directory(store), load, DamagedToolchain)


def discover_in(directory: Path, loader: Callable[[Path], T],
                damage: type[Exception]) -> tuple[list[T], list[str]]:
    """The roots kept in ``directory`` (by name), each read by ``loader``,
    and one line per root that raised ``damage``."""
    try:
        names = sorted(entry.name for entry in directory.iterdir()
                       if entry.is_dir() and valid_name(entry.name))
    except OSError:
        return [], []
    found, damaged = [], []
    for name in names:
        try:
            found.append(loader(directory / name))
        except damage as exc:
            damaged.append(str(exc))
    return found, damaged


# --- what a kernel needs -------------------------------------------------------


def kernel_version(release: str, tree: Path | None = None) -> tuple[int, int] | None:
    """(major, minor) of a release, from its name or, for a tree given by
    path, its ``include/config/kernel.release``."""
    text = release
    if tree is not None and release.startswith("/"):
        try:
            text = (tree / "include" / "config" / "kernel.release").read_text()
        except OSError:
            return None
    match = _KERNEL_VERSION.match(text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def kernel_compiler(tree: Path) -> str | None:
    """The compiler the release's headers call (``gcc-12``,
    ``x86_64-linux-gnu-gcc-14``): Debian's ``.kernelvariables`` ``CC``
    line, else the first word of ``CONFIG_CC_VERSION_TEXT``."""
    try:
        variables = (tree / ".kernelvariables").read_text(errors="replace")
    except OSError:
        variables = ""
    for match in _CC_LINE.finditer(variables):
        words = match.group(1).split()
        if words:
            return words[-1].replace("$(CROSS_COMPILE)", "")
    try:
        config = (tree / ".config").read_text(errors="replace")
    except OSError:
        return None
    found = _CC_TEXT.search(config)
    return found.group(1) if found else None


def host_paths(tree: Path, release: str) -> list[Path]:
    """The host's files under /usr that an installed release's build needs
    (its trees, the kbuild directories their links lead to, its
    ``/usr/lib/modules`` entry): shown in a toolchain's sandbox, whose /usr
    is another system's."""
    trees = [tree]
    try:
        makefile = (tree / "Makefile").read_text(errors="replace")
    except OSError:
        makefile = ""
    trees += [Path(match.group(1)) for match in _INCLUDE.finditer(makefile)
              if match.group(1).startswith("/")]
    found = {Path("/usr/lib/modules") / release}
    for each in trees:
        found.add(each)
        try:
            entries = list(each.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry))
                if not any(target == t or t in target.parents for t in trees):
                    found.add(target.parent)
    return sorted(path for path in found
                  if Path("/usr") in path.parents and path.exists())


# --- choosing ----------------------------------------------------------------


def _unfit(toolchain: Toolchain, client_family: int, version: tuple[int, int] | None,
           compiler: str | None) -> str | None:
    """Why ``toolchain`` cannot answer (None: it can)."""
    if toolchain.family != client_family:
        return (f"makes modules for SystemTap {toolchain.family}.x clients' staprun "
                f"({client_family}.x's refuses them)")
    newest = toolchain.newest_kernel
    if newest is not None and version is not None and version > newest:
        return f"builds for kernels up to {newest[0]}.{newest[1]} only"
    if compiler is not None and not toolchain.has_compiler(compiler):
        return f"has no {compiler}, which the kernel's headers call"
    return None


def choose(toolchains: Sequence[Toolchain], client_version: str, release: str,
           version: tuple[int, int] | None, compiler: str | None) -> Toolchain | str:
    """The first toolchain (the host's comes first) that makes modules the
    client's staprun loads, for a kernel it builds, with the compiler the
    headers call; or the client's one ``Server:`` line when none does."""
    wanted = family(client_version)
    reasons = []
    for toolchain in toolchains:
        reason = _unfit(toolchain, wanted, version, compiler)
        if reason is None:
            return toolchain
        reasons.append(f"{toolchain.describe()} {reason}")
    others = sorted({toolchain.family for toolchain in toolchains
                     if _unfit(toolchain, toolchain.family, version, compiler) is None}
                    - {wanted})
    would = (" A SystemTap " + " or ".join(f"{number}.x" for number in others)
             + " client would be served." if others else
             " No client would be: the server's administrator can add a toolchain that does "
             "(python -m stapsrv.cli.toolchains).")
    return (f"Server: No toolchain of this server builds for kernel release '{release}' "
            f"modules that a SystemTap {client_version} client's staprun loads: "
            + "; ".join(reasons) + "." + would)


def serves(toolchain: Toolchain, version: tuple[int, int] | None,
           compiler: str | None) -> bool:
    """Whether ``toolchain`` builds for a kernel (its version, its headers'
    compiler) for the clients of its own family."""
    return _unfit(toolchain, toolchain.family, version, compiler) is None


def ordered(host: Toolchain, others: Iterable[Toolchain]) -> list[Toolchain]:
    """The host's first (fidelity to 4.8 where it fits), then by name."""
    return [host, *sorted(others, key=lambda toolchain: toolchain.name)]


_VERSION_TEXT = re.compile(r"\(version (\d+(?:\.\d+)+)")


def translator_version(text: str) -> str | None:
    """``4.8`` from ``stap -V``'s first line."""
    found = _VERSION_TEXT.search(text)
    return found.group(1) if found else None
