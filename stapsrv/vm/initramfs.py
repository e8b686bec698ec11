"""The initramfs a module runs from: the client's own ``staprun`` and
``stapio`` with the libraries they load (read from their ELF headers, and
NSS's modules, which it opens at run time), busybox for ``/init``, the
module, and ``/init`` itself, which loads the module with ``staprun`` and
prints markers around what it printed (:mod:`stapsrv.vm.console`).

The client's files are copied from a root directory (``/`` for the
machine's own clients) with the symbolic links that lead to them, so each
file is where its client expects it.  Blocking file work: callers run it
in a thread.  No root is needed: owners and modes (``staprun`` setuid
root, group ``stapusr``) are written into the archive, not onto disk.
"""

from __future__ import annotations

import glob
import gzip
import os
import posixpath
import shlex
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from attrs import frozen

from stapsrv.vm import cpio
from stapsrv.vm.elf import NotElf, dependencies

BUSYBOX = "/bin/busybox"
#: Where the VM's own tools are (apart from the client's files).
OWN = "/stapsrv"
WORK = f"{OWN}/work"
#: The unprivileged user of the VM and the groups staprun knows.
USER, USER_ID = "stapuser", 1000
GROUPS = {"stapusr": 156, "stapsys": 157, "stapdev": 158}
#: Marker lines on the console (:mod:`stapsrv.vm.console` reads them).
MARK = "@@stapsrv-vm"
#: NSS's modules: dlopened by libnss3 when staprun checks a signature.
NSS_MODULES = ("libsoftokn3.so", "libfreebl3.so", "libfreeblpriv3.so", "libnssdbm3.so")
_LIBRARY_DIRECTORIES = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                        "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                        "/lib64", "/usr/lib64", "/lib", "/usr/lib")
_MAX_LINKS = 40
#: Bytes of one file put in an initramfs (staprun, a library, a module).
MAX_FILE = 256 << 20


class MissingFile(Exception):
    """A file the VM needs is not there (or not readable); one line."""


@frozen
class Staprun:
    """A client's ``staprun``: the root directory its files are in, and
    where in it are ``staprun``, ``stapio`` and the ``sysconfdir`` whose
    ``systemtap/staprun`` holds the signers it trusts."""

    root: Path
    staprun: str
    stapio: str
    sysconfdir: str
    #: A readable copy of the staprun program to put at ``staprun`` (the
    #: client's own may be unreadable: 5.5 installs it mode 4110); it must
    #: be there, as stapio runs it by that path to unload the module.
    program: Path | None = None

    @classmethod
    def host(cls) -> Staprun:
        """The machine's own (Debian's) ``staprun``."""
        return cls(Path("/"), "/usr/bin/staprun", "/usr/lib/systemtap/stapio", "/etc")

    @classmethod
    def prefix(cls, prefix: str) -> Staprun:
        """A SystemTap installed under ``prefix`` (e.g. ``/opt/stap55``)."""
        prefix = prefix.rstrip("/")
        return cls(Path("/"), f"{prefix}/bin/staprun",
                   f"{prefix}/libexec/systemtap/stapio", f"{prefix}/etc")

    @classmethod
    def in_root(cls, root: Path) -> Staprun:
        """Another distribution's SystemTap, in the file system at ``root``:
        ``stapio`` where Debian or Fedora put it."""
        stapio = next((path for path in ("/usr/lib/systemtap/stapio",
                                         "/usr/libexec/systemtap/stapio")
                       if (root / path.lstrip("/")).exists()), "/usr/libexec/systemtap/stapio")
        return cls(root, "/usr/bin/staprun", stapio, "/etc")

    @classmethod
    def named(cls, name: str) -> Staprun:
        """``host``; a prefix (a directory with ``bin/staprun``); or a root
        directory (with ``usr/bin/staprun``)."""
        if name in ("", "host", "/"):
            return cls.host()
        path = Path(name)
        if (path / "bin" / "staprun").exists() and not (path / "usr").is_dir():
            return cls.prefix(str(path))
        if (path / "usr" / "bin" / "staprun").exists():
            return cls.in_root(path)
        raise MissingFile(f"{name} holds no staprun (neither bin/staprun nor usr/bin/staprun)")

    def describe(self) -> str:
        where = "" if self.root == Path("/") else f" in {self.root}"
        return f"{self.staprun}{where}"


@frozen
class Job:
    """What ``/init`` does: load ``module`` with ``staprun`` (with
    ``options``, and ``-c command`` when given), as root or, with
    ``group`` (``stapusr`` or ``stapsys``), as the user ``stapuser`` of that
    group (a stapsys user is in stapusr too); bounded by ``seconds``.  ``signers``
    is an NSS database directory put where ``staprun`` looks for trusted
    signers; ``files`` are more of the client's files the VM needs at the
    same path (a program a process probe names), from the file system its
    ``staprun`` is in (the machine's, or another distribution's root),
    else the machine's."""

    module: Path
    options: tuple[str, ...] = ()
    command: str | None = None
    group: str | None = None
    signers: Path | None = None
    files: tuple[str, ...] = ()
    seconds: int = 120


class Tree:
    """The archive's members, by path, parents first."""

    def __init__(self) -> None:
        self.entries: dict[str, cpio.Entry] = {"/": cpio.directory("/")}

    def put(self, entry: cpio.Entry) -> None:
        name = posixpath.normpath("/" + entry.name.lstrip("/"))
        self.directories(posixpath.dirname(name))
        self.entries[name] = cpio.Entry(name, entry.mode, entry.data, entry.uid, entry.gid,
                                        entry.rdev)

    def directories(self, path: str, mode: int = 0o755) -> None:
        parts = [part for part in path.split("/") if part]
        for index in range(len(parts)):
            name = "/" + "/".join(parts[:index + 1])
            if name not in self.entries:
                self.entries[name] = cpio.directory(name, mode)

    def copy(self, root: Path, path: str, links: int = 0) -> str:
        """Copy ``path`` of the file system at ``root``, with every symbolic
        link on the way; its real path there."""
        if links > _MAX_LINKS:
            raise MissingFile(f"too many symbolic links to {path}")
        parts = [part for part in posixpath.normpath(path).split("/") if part]
        current = "/"
        for index, part in enumerate(parts):
            name = posixpath.join(current, part)
            source = root / name.lstrip("/")
            try:
                info = os.lstat(source)
            except OSError as exc:
                raise MissingFile(f"{source}: {exc.strerror}") from exc
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(source)
                self.put(cpio.symlink(name, target))
                resolved = posixpath.normpath(posixpath.join(current, target))
                return self.copy(root, posixpath.join(resolved, *parts[index + 1:]), links + 1)
            if stat.S_ISDIR(info.st_mode):
                if name not in self.entries:
                    self.put(cpio.directory(name, stat.S_IMODE(info.st_mode)))
                current = name
                continue
            if index != len(parts) - 1 or not stat.S_ISREG(info.st_mode):
                raise MissingFile(f"{source} is not a regular file")
            if name in self.entries and self.entries[name].data:
                return name  # had already (a library many others need)
            self.put(cpio.regular(name, read_regular(source),
                                  stat.S_IMODE(info.st_mode) & 0o755))
            return name
        return current

    def members(self) -> list[cpio.Entry]:
        return list(self.entries.values())


def read_regular(source: Path, limit: int = MAX_FILE) -> bytes:
    """A regular file's bytes, never through a link in its last part, never
    a FIFO or a device (a root may be someone else's, and change under us),
    at most ``limit`` bytes."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MissingFile(f"cannot read {source}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as opened:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MissingFile(f"{source} is not a regular file")
        data = opened.read(limit + 1)
    if len(data) > limit:
        raise MissingFile(f"{source} is larger than {limit >> 20} MiB")
    return data


def library_directories(root: Path) -> list[str]:
    """Where the dynamic loader of ``root`` looks: its ``ld.so.conf``
    (with includes), then the usual directories."""
    found: list[str] = []

    def read(conf: Path, depth: int = 0) -> None:
        try:
            lines = read_regular(conf, 1 << 20).decode(errors="replace").splitlines()
        except MissingFile:
            return
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include") and depth < 4:
                pattern = line.split(None, 1)[1] if " " in line else ""
                if ".." in pattern.split("/"):
                    continue  # never out of the root
                for name in sorted(glob.glob(str(root / pattern.lstrip("/")))):
                    read(Path(name), depth + 1)
            elif line.startswith("/"):
                found.append(line)
    read(root / "etc" / "ld.so.conf")
    return [*dict.fromkeys([*found, *_LIBRARY_DIRECTORIES])]


def _find_library(root: Path, name: str, search: Sequence[str]) -> str | None:
    for directory in search:
        candidate = posixpath.join(directory, name)
        if (root / candidate.lstrip("/")).exists():
            return candidate
    return None


def copy_program(tree: Tree, root: Path, path: str, directories: Sequence[str],
                 source: Path | None = None) -> None:
    """A program or library of ``root`` with everything it loads; from
    ``source`` instead of ``root``'s own file when given."""
    pending = [path]
    done: set[str] = set()
    while pending:
        wanted = pending.pop()
        if source is not None and wanted == path:
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise MissingFile(f"cannot read {source}: {exc.strerror}") from exc
            tree.put(cpio.regular(path, data, 0o755))
            real = path
        else:
            real = tree.copy(root, wanted)
            data = tree.entries[real].data
        if real in done:
            continue
        done.add(real)
        try:
            needs = dependencies(data)
        except NotElf:
            continue
        origin = posixpath.dirname(real)
        search = [entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
                  for entry in needs.search]
        if needs.interpreter:
            pending.append(needs.interpreter)
        for name in needs.needed:
            found = _find_library(root, name, [*search, *directories])
            if found is None:
                raise MissingFile(f"{path} needs {name}, which {root} does not have")
            pending.append(found)


def _nss_modules(root: Path, directories: Sequence[str]) -> Iterator[str]:
    for directory in directories:
        for name in NSS_MODULES:
            for sub in ("", "nss"):
                candidate = posixpath.join(directory, sub, name)
                if (root / candidate.lstrip("/")).exists():
                    yield candidate
                    check = candidate[:-3] + ".chk"
                    if (root / check.lstrip("/")).exists():
                        yield check


def init_script(staprun: Staprun, job: Job) -> str:
    """``/init``: markers on the console around ``staprun``'s output.
    Before powering off it waits for the console to have sent everything
    (``stty`` sets its mode with TCSADRAIN): an emulated serial port under
    load may still hold the exit marker, which ``poweroff -f`` would lose."""
    module = f"{WORK}/{job.module.name}"
    command = ["timeout", str(job.seconds), staprun.staprun, *job.options]
    if job.command is not None:
        command += ["-c", job.command]
    command.append(module)
    run = " ".join(shlex.quote(word) for word in command)
    who = "$(id -un)"
    if job.group is not None:
        who = f"$(su -s {OWN}/bin/sh {USER} -c 'id -un')"
        inner = f"export PATH=$PATH; cd {WORK} && exec {run}"
        run = f"su -s {OWN}/bin/sh {USER} -c {shlex.quote(inner)}"
    return f"""#!{OWN}/busybox sh
{OWN}/busybox mkdir -p {OWN}/bin
{OWN}/busybox --install -s {OWN}/bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:{OWN}/bin
echo "{MARK} init@@"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs -o mode=0755 debugfs /sys/kernel/debug
mount -t tmpfs -o mode=1777 tmpfs /tmp
cd {WORK}
echo "{MARK} run {who}@@"
{run} >/tmp/stapsrv.out 2>/tmp/stapsrv.err
code=$?
echo "{MARK} output@@"
cat /tmp/stapsrv.out
printf '\\n{MARK} errors@@\\n'
cat /tmp/stapsrv.err
printf '\\n{MARK} exit %d@@\\n' "$code"
stty -F /dev/console onlcr 2>/dev/null
sync
poweroff -f
"""


def build(staprun: Staprun, job: Job, busybox: str = BUSYBOX) -> Tree:
    """The tree of the initramfs."""
    if job.group not in (None, "stapusr", "stapsys"):
        raise MissingFile(f"no group {job.group} in the VM (stapusr or stapsys)")
    tree = Tree()
    for name in ("/proc", "/sys", "/dev", "/tmp", "/root"):
        tree.directories(name)
    tree.put(cpio.char_device("/dev/console", 5, 1))
    tree.put(cpio.char_device("/dev/null", 1, 3, 0o666))
    try:
        tree.put(cpio.regular(f"{OWN}/busybox", Path(busybox).read_bytes(), 0o755))
        module = job.module.read_bytes()
    except OSError as exc:
        raise MissingFile(f"cannot read {exc.filename}: {exc.strerror}") from exc
    root = staprun.root
    directories = library_directories(root)
    copy_program(tree, root, staprun.staprun, directories, staprun.program)
    copy_program(tree, root, staprun.stapio, directories)
    for library in _nss_modules(root, directories):
        copy_program(tree, root, library, directories)
    if (root / "etc" / "ld.so.cache").exists():
        tree.copy(root, "/etc/ld.so.cache")
    for path in job.files:
        # The client's own: from the root its staprun is in (the machine's
        # for its own clients), with the libraries that root has; the
        # machine's when that root has no such file (the static busybox
        # of the process probes).
        if os.path.lexists(root / path.lstrip("/")):
            copy_program(tree, root, path, directories)
        else:
            copy_program(tree, Path("/"), path, library_directories(Path("/")))
    # staprun as its packages install it: setuid root, run by group stapusr.
    real = staprun.staprun if staprun.program else tree.copy(root, staprun.staprun)
    tree.put(cpio.regular(real, tree.entries[real].data, stat.S_ISUID | 0o754,
                          gid=GROUPS["stapusr"]))
    members = {"stapusr", job.group} if job.group else set()
    tree.put(cpio.regular("/etc/passwd", (
        f"root:x:0:0:root:/root:{OWN}/bin/sh\n"
        f"{USER}:x:{USER_ID}:{USER_ID}:{USER}:/tmp:{OWN}/bin/sh\n").encode()))
    tree.put(cpio.regular("/etc/group", (
        "root:x:0:\n"
        + "".join(f"{name}:x:{gid}:{USER if name in members else ''}\n"
                  for name, gid in GROUPS.items())
        + f"{USER}:x:{USER_ID}:\n").encode()))
    tree.directories(WORK, 0o755)
    tree.put(cpio.regular(f"{WORK}/{job.module.name}", module, 0o644))
    sgn = job.module.with_name(job.module.name + ".sgn")
    if sgn.exists():
        tree.put(cpio.regular(f"{WORK}/{sgn.name}", sgn.read_bytes(), 0o644))
    if job.signers is not None:
        put_signers(tree, staprun, job.signers)
    tree.put(cpio.regular("/init", init_script(staprun, job).encode(), 0o755))
    return tree


def put_signers(tree: Tree, staprun: Staprun, signers: Path) -> None:
    """The trusted signers' NSS database.  ``staprun``'s permission check
    wants the legacy database files too (the clients write only the SQL
    ones), and 5.5 checks ``sql:DIR`` as a relative path: an empty file of
    each, and ``sql:`` in the working directory leading to ``/``
    (``doc/differences.md``)."""
    directory = posixpath.join(staprun.sysconfdir, "systemtap", "staprun")
    tree.directories(directory)
    for path in sorted(signers.iterdir()):
        if path.is_file():
            tree.put(cpio.regular(posixpath.join(directory, path.name), path.read_bytes()))
    for legacy in ("cert8.db", "key3.db", "secmod.db"):
        name = posixpath.join(directory, legacy)
        if name not in tree.entries:
            tree.put(cpio.regular(name, b""))
    tree.put(cpio.symlink(f"{WORK}/sql:", "/"))


def write(staprun: Staprun, job: Job, target: Path, busybox: str = BUSYBOX) -> None:
    """The gzip'd archive at ``target``."""
    data = cpio.archive(build(staprun, job, busybox).members())
    with open(target, "wb") as out:
        out.write(gzip.compress(data, compresslevel=1))
