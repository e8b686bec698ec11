"""Which files a request's user-space probes are resolved against.

A ``process("/usr/lib/x86_64-linux-gnu/libc.so.6").function("malloc")``
probe is placed by the translator at the offset it reads in the file it
sees at that path, and the module checks the build-id of that file when
it runs.  A toolchain's translator (:mod:`stapsrv.kernel.toolchains`) sees
its own root: another distribution's libraries and programs.  So the
translator is pointed (``--sysroot``) at a root of the distribution the
client runs:

- a kernel release belongs to the distribution of the suite its packages
  came from (``bookworm-backports``, ``bookworm-security`` and
  ``bookworm`` are all bookworm, whose machines run bookworm's user
  space); a release installed on the server, or one stored without a
  recorded suite, to the server's own distribution;
- the root of the server's own distribution is the host's (its ``/usr``);
  that of another is a *user-space root* made for it by the admin command
  :mod:`stapsrv.cli.sysroots` (``debootstrap --variant=minbase`` of the
  suite, kept in the kernel store at ``STORE/.sysroots/<name>/``: ``root/``
  and ``manifest.json``, as a toolchain's), else a toolchain made from
  that distribution's suite (the forky toolchain's root for forky);
- nothing is needed when that root is the toolchain's own (the host's
  translator on the host's distribution, forky's for forky), and nothing
  can be done when the server has no root of that distribution (then the
  translator resolves against its own files, as before).

The client's files must be the same as the root's (same package versions):
the module carries the offsets and build-ids of the root's files.

Blocking file reads only: call from a thread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from attrs import frozen

from stapsrv.kernel.toolchains import MANIFEST, ROOT, Toolchain, discover_in

#: Where user-space roots are, inside the kernel store's directory.
SYSROOTS_DIRECTORY = ".sysroots"

#: Suite suffixes of Debian archives that update a distribution's release.
_UPDATE_SUFFIXES = ("-backports-sloppy", "-backports", "-proposed-updates", "-updates",
                    "-security")


def distribution(suite: str) -> str:
    """The distribution whose machines use a suite's packages:
    ``bookworm`` for ``bookworm-backports`` or ``bookworm-security``."""
    for suffix in _UPDATE_SUFFIXES:
        if suite.endswith(suffix) and len(suite) > len(suffix):
            return suite[:-len(suffix)]
    return suite


def host_distribution(os_release: Path = Path("/etc/os-release")) -> str | None:
    """The machine's own distribution (its ``VERSION_CODENAME``), or None."""
    try:
        lines = os_release.read_text(errors="replace").splitlines()
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    codename = fields.get("VERSION_CODENAME", "").strip().strip("\"'")
    return codename or None


class DamagedRoot(Exception):
    """A user-space root cannot serve: the message says what is wrong."""


@frozen
class UserRoot:
    """A root of a distribution's user space, made for its clients."""

    name: str
    suite: str
    root: Path
    #: A digest of its manifest (every package's version): part of cache keys.
    digest: str
    packages: tuple[tuple[str, str], ...] = ()

    def label(self) -> str:
        return f"root {self.name} {self.digest}"


def sysroots_directory(store: Path) -> Path:
    """Where the user-space roots of the kernel store ``store`` are."""
    return store / SYSROOTS_DIRECTORY


def load_root(directory: Path) -> UserRoot:
    """The user-space root kept in ``directory``; raises :class:`DamagedRoot`."""
    name = directory.name
    try:
        raw = (directory / MANIFEST).read_bytes()
        manifest = json.loads(raw)
        packages = {str(key): str(value) for key, value in manifest["packages"].items()}
        suite = str(manifest["suite"])
    except OSError as exc:
        raise DamagedRoot(f"root {name}: no manifest ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedRoot(f"root {name}: its manifest {directory / MANIFEST} cannot be "
                          f"read ({exc!r})") from exc
    root = directory / ROOT
    if not (root / "usr" / "lib").is_dir() or "libc6" not in packages:
        raise DamagedRoot(f"root {name}: {root} has no C library; make it again "
                          f"(python -m stapsrv.cli.sysroots update {name})")
    return UserRoot(name, suite, root, hashlib.sha256(raw).hexdigest()[:16],
                    tuple(sorted(packages.items())))


def discover_roots(store: Path) -> tuple[list[UserRoot], list[str]]:
    """The user-space roots kept in ``store`` (by name), and one line per
    damaged one."""
    return discover_in(sysroots_directory(store), load_root, DamagedRoot)


@frozen
class UserSpace:
    """Where a request's user-space probes are resolved: ``root`` (None:
    in the translator's own system), for clients of ``distribution``."""

    distribution: str | None
    root: Path | None = None
    #: Describes the root: ``host``, ``root NAME DIGEST`` or ``toolchain NAME ...``.
    label: str = ""
    #: The server has no root of that distribution.
    missing: bool = False


def user_space(toolchain: Toolchain, release_suite: str | None, host: str | None,
               toolchains: Iterable[Toolchain], roots: Sequence[UserRoot] = ()) -> UserSpace:
    """Where ``toolchain``'s translator resolves user-space probes for a
    release from ``release_suite`` (None: the host's own distribution
    ``host``), given the server's ``toolchains`` and user-space ``roots``."""
    wanted = distribution(release_suite) if release_suite else host
    if wanted is None:
        return UserSpace(None)
    if _own(toolchain, wanted, host):
        return UserSpace(wanted)
    if wanted == host:
        return UserSpace(wanted, Path("/"), "host")
    made = [each for each in roots if distribution(each.suite) == wanted]
    if made:
        return UserSpace(wanted, made[0].root, made[0].label())
    found = [each for each in toolchains if not each.is_host and each.suite
             and distribution(each.suite) == wanted]
    if not found:
        return UserSpace(wanted, missing=True)
    return UserSpace(wanted, found[0].root, f"toolchain {found[0].label()}")


def _own(toolchain: Toolchain, wanted: str, host: str | None) -> bool:
    """Whether ``toolchain``'s own system is of distribution ``wanted``."""
    if toolchain.is_host:
        return wanted == host
    return bool(toolchain.suite) and distribution(toolchain.suite) == wanted
