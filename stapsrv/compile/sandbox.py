"""The translator's sandbox: what one request's compile can see and touch.

Every translator run happens inside bubblewrap (``bwrap``), unprivileged,
in namespaces of its own (user, mount, PID, network, IPC, UTS, cgroup), with
no capabilities and no way to make further user namespaces.  Its file
system is built from nothing:

- read only: ``/usr`` (the toolchain, the tapsets, ``/lib/modules`` and the
  kernel build trees under ``/usr/src``), the few files of ``/etc`` that
  the toolchain reads, and the server's own trees the translator needs
  (fixed runtimes, ``-R``, ``-I`` directories, build trees elsewhere);
- writable: the request's scratch directory, and a private ``/tmp`` of
  64 MiB; everything else, the sandbox's own root included, is read only;
- in place of the server user's home and ``SYSTEMTAP_DIR``: empty private
  directories inside the scratch directory, mounted at the same paths, so
  the translator's messages name the same files as before while the
  server's key, MOKs, caches, configuration and other requests' scratch
  directories do not exist for it.

With a toolchain of another distribution than the client's, a root of the
client's distribution (:mod:`stapsrv.kernel.sysroots`) is shown read only
at :data:`SYSROOT` (its ``/usr``, the merged-/usr links, the loader's
configuration) and the translator is given ``--sysroot`` (pointing there);
the release's ``/boot`` files and the files shown over that root's own
are shown there too, since a translator with a sysroot looks for them
inside it.

The translator's own cache lives in that private ``SYSTEMTAP_DIR``, so
nothing one request compiles is seen by another.  Only the kernel
configuration header (``stapconf``, 10 to 20 seconds of kernel autoconf
per release) is shared: it is made by the server's own compile of a fixed
script (:class:`StapconfStore`), never taken from a client's compile, and
copied into each private cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from attrs import frozen

from stapsrv.config.values import ServerConfig
from stapsrv.kernel.store import store_directory
from stapsrv.paths import home_directory, systemtap_dir

BWRAP = "/usr/bin/bwrap"

#: Top-level directories that a merged-/usr system links into /usr.
_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: What of /etc the translator, make and gcc read.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd",
              "group", "nsswitch.conf", "localtime", "os-release")
#: Of those, the host's even in a toolchain's system: the users and the time.
_HOST_ETC = ("passwd", "group", "nsswitch.conf", "localtime")
#: Where a root of the client's distribution is shown (``--sysroot``).
SYSROOT = Path("/sysroot")
#: What of that root's /etc the translator reads: the loader's search path.
_SYSROOT_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d")
#: The server's environment the translator keeps (plus the client's locale).
_KEPT_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ",
                   "SYSTEMTAP_DIR")
_KEPT_PREFIXES = ("LC_", "SYSTEMTAP_")
#: A script the server compiles itself to make a release's stapconf header.
WARM_UP_SCRIPT = "probe begin { exit() }"


class SandboxUnavailable(Exception):
    """bubblewrap cannot run here; the message says why."""


def translator_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the server's environment a sandboxed translator gets."""
    return {name: value for name, value in environ.items()
            if name in _KEPT_VARIABLES or name.startswith(_KEPT_PREFIXES)}


def _system_words(root: Path = Path("/"), host_paths: Sequence[Path] = ()) -> list[str]:
    """The system the translator runs on: ``root``'s /usr (the host's, or a
    toolchain's), its merged-/usr links and the /etc files its programs read
    (the host's user and time zone files whatever the system); with
    ``host_paths`` (the host's files of an installed kernel release, under
    /usr) shown at their own paths in another system's /usr."""
    if root == Path("/"):
        words = ["--ro-bind", "/usr", "/usr"]
    else:
        words = _layered(root / "usr", Path("/usr"), host_paths)
    for name in _USR_LINKS:
        path = root / name
        if path.is_symlink():
            words += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            words += ["--ro-bind", str(path), f"/{name}"]
    for name in _ETC_FILES:
        etc = Path("/etc") if name in _HOST_ETC else root / "etc"
        words += ["--ro-bind-try", str(etc / name), f"/etc/{name}"]
    return words


def _sysroot_words(root: Path, files: Iterable[tuple[Path, str]]) -> list[str]:
    """``root`` shown at :data:`SYSROOT` (its /usr, the merged-/usr links,
    the loader's files), with the ``files`` the translator looks for in it:
    those under /boot, and those shown over a file ``root`` has."""
    words = ["--ro-bind", str(root / "usr"), f"{SYSROOT}/usr"]
    for name in _USR_LINKS:
        path = root / name
        if path.is_symlink():
            words += ["--symlink", os.readlink(path), f"{SYSROOT}/{name}"]
        elif path.is_dir():
            words += ["--ro-bind", str(path), f"{SYSROOT}/{name}"]
    for name in _SYSROOT_ETC:
        words += ["--ro-bind-try", str(root / "etc" / name), f"{SYSROOT}/etc/{name}"]
    for source, inside in files:
        relative = inside.lstrip("/")
        if inside.startswith("/boot/") or os.path.lexists(root / relative):
            words += ["--ro-bind", str(source), f"{SYSROOT}/{relative}"]
    return words


def _layered(source: Path, target: Path, extras: Sequence[Path]) -> list[str]:
    """``source`` shown read only at ``target``, with each of ``extras``
    (paths under ``target``) shown in place of what ``source`` has there:
    the directories that lead to one are rebuilt entry by entry (bwrap
    cannot make a mount point inside a read-only tree it does not own)."""
    inside = [path for path in extras if target in path.parents]
    if not inside:
        return ["--ro-bind", str(source), str(target)]
    words = ["--dir", str(target)]
    try:
        names = sorted(os.listdir(source))
    except OSError:
        names = []
    for name in names:
        child, place = source / name, target / name
        if place in inside:
            continue
        if child.is_symlink():
            words += ["--symlink", os.readlink(child), str(place)]
        elif child.is_dir():
            words += _layered(child, place, inside)
        elif child.exists():
            words += ["--ro-bind", str(child), str(place)]
    for path in inside:
        if path.parent == target or path.relative_to(target).parts[0] not in names:
            words += ["--ro-bind", str(path), str(path)]
    return words


#: /proc and /dev of its own, and a small private /tmp (the translator works
#: in the scratch directory, its TMPDIR).
_SPECIAL = ["--proc", "/proc", "--dev", "/dev", "--size", str(64 << 20), "--tmpfs", "/tmp"]
#: The namespaces and limits every sandbox has.
_ISOLATION = ["--unshare-user", "--unshare-all", "--disable-userns", "--die-with-parent",
              "--cap-drop", "ALL"]


@frozen
class Sandbox:
    """The sandbox of one server: where the translator's home and
    ``SYSTEMTAP_DIR`` are, and what else it may read."""

    home: Path
    systemtap_dir: Path
    read_only: tuple[Path, ...] = ()
    bwrap: str = BWRAP

    def private_dirs(self, scratch: Path) -> tuple[Path, Path]:
        """The request's own home and SYSTEMTAP_DIR, inside ``scratch``."""
        return scratch / "sandbox-home", scratch / "sandbox-systemtap"

    def words(self, scratch: Path, files: Iterable[tuple[Path, str]] = (),
              system: Path = Path("/"), host_paths: Sequence[Path] = (),
              sysroot: Path | None = None) -> list[str]:
        """bwrap's command line, up to and including ``--``, for a request
        whose scratch directory (made by :meth:`prepare`) is ``scratch``;
        ``files`` are (server file, path inside) shown read only, such as a
        fetched ``/boot/System.map-<release>``; ``system`` is the root whose
        /usr the translator runs on (a toolchain's), with ``host_paths``
        of the host's /usr shown in it; ``sysroot``, a root of the client's
        distribution shown at :data:`SYSROOT`."""
        files = list(files)
        home, systemtap_dir = self.private_dirs(scratch)
        words = [self.bwrap, *_ISOLATION, *_system_words(system, host_paths), *_SPECIAL]
        if self.home != Path("/"):
            words += ["--bind", str(home), str(self.home)]
        words += ["--bind", str(systemtap_dir), str(self.systemtap_dir)]
        for path in _outside_usr(self.read_only, hidden=(self.home, self.systemtap_dir)):
            words += ["--ro-bind", str(path), str(path)]
        for source, inside in files:
            words += ["--ro-bind", str(source), inside]
        if sysroot is not None:
            words += _sysroot_words(sysroot, files)
        words += ["--bind", str(scratch), str(scratch), "--remount-ro", "/",
                  "--chdir", str(scratch / "request"), "--"]
        return words

    def prepare(self, scratch: Path, rc_file: Path | None, stapconf: StapconfStore) -> None:
        """Make the request's private directories (blocking file work): the
        server user's ``rc`` options and the shared stapconf headers are
        copied in, nothing else."""
        home, systemtap_dir = self.private_dirs(scratch)
        home.mkdir(mode=0o700)
        systemtap_dir.mkdir(mode=0o700)
        if rc_file is not None and rc_file.is_file():
            shutil.copyfile(rc_file, systemtap_dir / "rc")
        stapconf.seed(systemtap_dir)

    def check(self, timeout: float = 30.0, system: Path = Path("/"),
              program: Sequence[str] = ("/usr/bin/true",)) -> str:
        """Run a command (``program``: a trivial one) in a sandbox like a
        translator's on ``system``; its output, or :class:`SandboxUnavailable`
        with bwrap's own words when it fails."""
        command = [self.bwrap, *_ISOLATION, *_system_words(system), *_SPECIAL,
                   "--remount-ro", "/", "--", *program]
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=timeout)
        except FileNotFoundError as exc:
            raise SandboxUnavailable(f"{self.bwrap} is not installed "
                                     "(Debian package bubblewrap)") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"{self.bwrap} cannot run: {exc}") from exc
        if result.returncode != 0:
            words = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            raise SandboxUnavailable(words)
        return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


def server_sandbox(config: ServerConfig, environ: Mapping[str, str],
                   runtimes: Mapping[str, str]) -> Sandbox:
    """The sandbox of ``config``'s server: its user's home and
    ``SYSTEMTAP_DIR`` from ``environ``, and, read only, the trees its
    translators are pointed at: the fixed runtimes, the server's ``-I`` and
    ``-R``, releases given as build trees, the translator's own installation
    when it is not under /usr, and ``SYSTEMTAP_*`` directories."""
    trees = [Path(path) for path in runtimes.values()]
    trees += [Path(option.value) for option in config.server_options
              if option.flag in ("-I", "-R") and option.value]
    trees += [Path(release) for release in config.releases if release.startswith("/")]
    if config.fetch_kernels:
        trees.append(store_directory(config))
    stap = Path(shutil.which(config.stap, path=environ.get("PATH")) or config.stap)
    trees.append(stap.parent.parent if stap.parent.name == "bin" else stap.parent)
    trees += [Path(value) for name, value in environ.items()
              if name.startswith("SYSTEMTAP_") and name != "SYSTEMTAP_DIR"
              and value.startswith("/")]
    return Sandbox(home=home_directory(environ), systemtap_dir=systemtap_dir(environ),
                   read_only=tuple(trees))


def _outside_usr(paths: Iterable[Path], hidden: Iterable[Path] = ()) -> list[Path]:
    """Existing paths not already visible through /usr, each once, sorted;
    never one that holds a ``hidden`` directory (the server user's home and
    ``SYSTEMTAP_DIR``, where its key and MOKs are), which would show it
    again: a tree inside them is shown, one around them is not."""
    covered = [Path(os.path.abspath(path)) for path in hidden]
    found = set()
    for path in paths:
        path = Path(os.path.abspath(path))
        if path == Path("/usr") or Path("/usr") in path.parents or not path.exists():
            continue
        if any(path == secret or path in secret.parents for secret in covered):
            continue
        found.add(path)
    return sorted(found)


def warm_up_key(stap: str, tree: Path, runtime: str | None, guru: bool,
                server_options: Iterable[str]) -> str:
    """A name for one warm-up's inputs, close to what the translator hashes
    for its stapconf header (itself, the compiler, the kernel tree, the
    runtime, guru mode, the build options).  Equal names mean the warm-up
    was done; a header the translator then names otherwise is only missed
    (each request makes its own, privately), never wrong."""
    def identity(path: str | Path | None) -> list[object]:
        if not path:
            return [None]
        try:
            info = os.stat(path)
        except OSError:
            return [str(path), None]
        return [os.path.realpath(path), info.st_size, info.st_mtime_ns]

    parts = [identity(shutil.which(stap) or stap), identity(shutil.which("gcc")),
             identity(tree), identity(tree / ".config"), identity(tree / "Makefile"),
             identity(runtime), guru, sorted(server_options)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


class StapconfStore:
    """Kernel configuration headers (``stapconf_*.h``) made by the server's
    own warm-up compiles, shared read-only with every request.

    The translator finds one by a hash of the kernel tree, runtime,
    compiler, guru mode and kbuild flags, so a request with other values
    simply makes its own, privately."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def warmed(self, key: str) -> bool:
        return (self.directory / "warmed" / key).exists()

    def mark_warmed(self, key: str) -> None:
        marker = self.directory / "warmed" / key
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()

    def seed(self, systemtap_dir: Path) -> int:
        """Copy every stored header a private ``SYSTEMTAP_DIR``'s cache does
        not have yet into it; how many were copied."""
        copied = 0
        for header in self._headers(self.directory):
            target = systemtap_dir / "cache" / header.parent.name
            if (target / header.name).exists():
                continue
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(header, target / header.name)
            copied += 1
        return copied

    def collect(self, systemtap_dir: Path) -> int:
        """Keep the headers a warm-up compile made; how many were new."""
        added = 0
        for header in self._headers(systemtap_dir / "cache"):
            target = self.directory / header.parent.name / header.name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(header, partial)
            os.replace(partial, target)
            added += 1
        return added

    @staticmethod
    def _headers(cache: Path) -> list[Path]:
        try:
            buckets = [entry for entry in cache.iterdir()
                       if entry.is_dir() and not entry.is_symlink()]
        except OSError:
            return []
        return sorted(header for bucket in buckets for header in bucket.glob("stapconf_*.h")
                      if header.is_file() and not header.is_symlink())
