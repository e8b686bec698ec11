"""A Debian bookworm booted with systemd-nspawn, for the package tests.

The bookworm root is debootstrapped once (minbase, systemd, dbus) and kept
under ``/var/cache/stapsrv-ci``; a second cached root adds what the package
needs from the archive (systemtap, the kernel headers the host's tests
build for, the package's other dependencies).  Each test run boots an
overlay over that root, so it starts clean and leaves the cache as it was.
The container shares the host's network: a client on the host reaches a
server inside on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("STAPSRV_CI_CACHE", "/var/cache/stapsrv-ci"))
MIRROR = "http://deb.debian.org/debian"
#: What the container gets from the archive before the package comes.
PACKAGES = ("systemtap", "bubblewrap", "libnss3-tools", "procps", "adduser")
#: What changes in a booted system whatever is installed: left out of the
#: listings that compare before and after.
VOLATILE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log/journal",
            "/var/lib/dpkg", "/var/lib/apt", "/var/cache", "/var/log/apt",
            "/var/log/dpkg.log", "/var/lib/systemd/random-seed", "/var/lib/systemd/timers",
            "/var/lib/systemd/catalog", "/var/log/alternatives.log", "/root",
            "/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/ld.so.cache")


def _run(argv: list[str], timeout: float = 1800) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): "
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _build(target: Path, make: "list[list[str]]") -> Path:
    """Make ``target`` by running ``make`` into ``target.new``, then rename
    (an interrupted build is never taken for a finished one)."""
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".new")
    shutil.rmtree(partial, ignore_errors=True)
    for argv in make:
        _run([word.replace("{root}", str(partial)) for word in argv])
    partial.rename(target)
    return target


def base_root() -> Path:
    """The debootstrapped bookworm (minutes the first time)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return _build(CACHE / "bookworm-base", [[
        "debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus",
        "bookworm", "{root}", MIRROR]])


def prepared_root(release: str) -> Path:
    """The base root with the package's dependencies and ``release``'s
    headers installed, from the host's apt sources (security updates carry
    the newest kernel ABI)."""
    base = base_root()
    sources = "/etc/apt/sources.list.d/debian.sources"
    install = ("apt-get update -q && apt-get install -y -q --no-install-recommends "
               f"{' '.join(PACKAGES)} linux-headers-{release} && apt-get clean")
    steps = [["cp", "-a", str(base), "{root}"]]
    if Path(sources).is_file():
        steps += [["rm", "-f", "{root}/etc/apt/sources.list"],
                  ["cp", sources, "{root}/etc/apt/sources.list.d/"]]
    steps.append(["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", "{root}",
                  "--setenv=DEBIAN_FRONTEND=noninteractive", "sh", "-c", install])
    return _build(CACHE / f"bookworm-{release}", steps)


class Container:
    """A booted overlay over a cached root; ``root`` is its file system as
    the host sees it."""

    def __init__(self, lower: Path, scratch: Path) -> None:
        self.scratch = scratch
        self.root = scratch / "merged"
        for name in ("upper", "work", "merged"):
            (scratch / name).mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
              str(self.root)])
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self, timeout: float = 120) -> None:
        """Boot systemd in the container and wait for it to be up."""
        with open(self.scratch / "console.log", "wb") as console:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--boot", "-q",
                 "-D", str(self.root), f"--machine=stapsrv-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.init_pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the container did not boot: "
                                   + (self.scratch / "console.log").read_text(errors="replace"))
            children = subprocess.run(["pgrep", "-P", str(self.process.pid)],
                                      capture_output=True, text=True).stdout.split()
            if children:
                self.init_pid = int(children[0])
            else:
                time.sleep(0.2)
        self.run("systemctl", "is-system-running", "--wait", timeout=timeout, check=False)

    def run(self, *argv: str, timeout: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the booted container (as root)."""
        environment = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
                       *(f"{name}={value}" for name, value in (env or {}).items())]
        result = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", *environment,
                                 *argv], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): "
                                 f"{result.stdout}{result.stderr}")
        return result

    def listing(self) -> set[str]:
        """Every path of the container's file system but the volatile ones."""
        prune: list[str] = []
        for path in VOLATILE:
            prune += ["-path", path, "-o"]
        found = self.run("find", "/", "-xdev", "(", *prune[:-1], ")", "-prune", "-o",
                         "-print", timeout=300)
        return set(found.stdout.splitlines())

    def close(self) -> None:
        """Power the container off (killing it if it hangs) and remove it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nspawn asks the container's systemd to halt
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        subprocess.run(["umount", str(self.root)], capture_output=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
