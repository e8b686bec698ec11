"""The forky toolchain of the tests, made once with the admin command
(``python -m stapsrv.cli.toolchains update forky``, debootstrap: minutes)
in the VM tests' kernel store, where kernel images and symbols are kept
too, and used from there by a server on that store.

It is kept between runs (``/var/cache/stapsrv-ci/vm-store/.toolchains``
when the tests run as root) and made again when absent, damaged or
lacking a package of the suite's list (a root kept from before a package
joined it, e.g. the arm64 cross compiler of issue 30); the
packages debootstrap fetched are kept in ``/var/cache/stapsrv-ci/debootstrap``
(or ``$STAPSRV_CI_DEBOOTSTRAP``).  Making it needs root."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from twisted.internet.defer import Deferred

from stapsrv.cli.toolchains import SUITES
from stapsrv.kernel.privateapt import APT_DIRECTORY
from stapsrv.kernel.toolchains import DamagedToolchain, Toolchain, load, toolchains_directory
from tests.helpers import require, require_program
from tests.helpers.realserver import (
    Client,
    ClientKind,
    ServerProcess,
    as_server_user,
    kept_directory,
    owned_directory,
    run,
    shared_server,
    venv_bin,
)
from tests.helpers.vm import vm_store

#: Seconds the last making of the toolchain took in this process (None: it
#: was there already).
made_in: float | None = None


def forky_store() -> Path:
    """A kernel store (the VM tests') holding a working forky toolchain."""
    global made_in
    store = vm_store()
    try:
        kept = load(toolchains_directory(store) / "forky")
        if not set(SUITES["forky"].packages) - {name for name, _ in kept.packages}:
            return store
    except DamagedToolchain:
        pass
    require(os.geteuid() == 0, "making the forky toolchain needs root (debootstrap)")
    require_program("debootstrap")
    cache = Path(os.environ.get("STAPSRV_CI_DEBOOTSTRAP") or
                 kept_directory("STAPSRV_CI_DEBOOTSTRAP", "debootstrap"))
    started = time.monotonic()
    done = subprocess.run([venv_bin("python"), "-m", "stapsrv.cli.toolchains", "--store",
                           str(store), "update", "forky", "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=3600, cwd="/")
    if done.returncode != 0:
        raise AssertionError(f"making the forky toolchain failed: {done.stdout[-2000:]}"
                             f"{done.stderr[-3000:]}")
    made_in = time.monotonic() - started
    return store


def forky() -> Toolchain:
    return load(toolchains_directory(forky_store()) / "forky")


def toolchain_server() -> ServerProcess:
    """One server for the run on the store with the forky toolchain."""
    return shared_server("stapsrv", ("--kernel-store", str(forky_store())))


# --- forky's own client ----------------------------------------------------------


def forky_client_kind() -> ClientKind:
    """forky's SystemTap 5.6 client, as installed in the forky root."""
    root = forky().root
    return ClientKind("5.6", str(root / "usr" / "bin" / "stap"),
                      str(root / "usr" / "bin" / "staprun"), str(root / "etc"))


def forky_zip(store: Path, directory: Path) -> Path:
    """forky's ``zip`` and ``unzip`` (the client packs its request with
    them; the toolchain root has neither), fetched through ``store``'s
    private apt configuration (one that has forky) and unpacked into
    ``directory``: the directory holding the programs."""
    download = owned_directory(directory / "download")
    done = subprocess.run(
        as_server_user(["apt-get", "-c", str(store / APT_DIRECTORY / "apt.conf"), "download",
                        "-q", "zip", "unzip"]),
        cwd=download, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    if done.returncode != 0:
        raise AssertionError(f"fetching forky's zip and unzip failed: {done.stderr[-2000:]}")
    for deb in sorted(download.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(directory / "root")], check=True)
    return directory / "root" / "usr" / "bin"


class ForkyClient(Client):
    """forky's own ``stap``, run in the forky root (bubblewrap: the root as
    its system, the host's network, its own SYSTEMTAP_DIR and working
    directory bound in), as a forky machine runs it."""

    def __init__(self, base: Path, zip_programs: Path) -> None:
        super().__init__(base, forky_client_kind())
        self.zip_programs = zip_programs

    def stap(self, *args: str, stdin: bytes | None = None,
             env: Mapping[str, str] | None = None) -> Deferred[tuple[bytes, bytes, int]]:
        inside = Path("/tmp/client")
        settings = {"PATH": "/usr/bin:/bin:/tmp/zip", "HOME": str(inside),
                    "SYSTEMTAP_DIR": str(inside / "systemtap"), "LANG": "C.UTF-8",
                    **(env or {})}
        argv = ["bwrap", "--ro-bind", str(forky().root), "/", "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", str(self.zip_programs),
                "/tmp/zip", "--bind", str(self.dir), str(inside), "--chdir",
                str(inside / "cwd"), "--clearenv"]
        for name, value in settings.items():
            argv += ["--setenv", name, value]
        return run(["/usr/bin/bwrap", *argv[1:], "/usr/bin/stap", *args], {}, self.cwd, stdin)
