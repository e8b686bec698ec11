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
from pathlib import Path

from stapsrv.cli.toolchains import SUITES
from stapsrv.kernel.toolchains import DamagedToolchain, Toolchain, load, toolchains_directory
from tests.helpers import require, require_program
from tests.helpers.realserver import ServerProcess, kept_directory, shared_server, venv_bin
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
