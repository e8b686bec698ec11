"""The trixie user-space root of the tests, made once with the admin
command (``python -m stapsrv.cli.sysroots update trixie``, debootstrap
minbase, with trixie's staprun: a minute or more) in the VM tests' kernel
store beside the forky toolchain, and used from there.

It is kept between runs (``/var/cache/stapsrv-ci/vm-store/.sysroots``
when the tests run as root) and made again when absent or damaged; the
packages debootstrap fetched are kept in ``/var/cache/stapsrv-ci/debootstrap``
(or ``$STAPSRV_CI_DEBOOTSTRAP``).  Making it needs root."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from stapsrv.kernel.sysroots import DamagedRoot, UserRoot, load_root, sysroots_directory
from tests.helpers import require, require_program
from tests.helpers.realserver import kept_directory, venv_bin
from tests.helpers.vm import vm_store

#: Besides trixie's minimal system: its staprun, with which the VM runs
#: the modules of trixie's clients (their staprun and their C library).
INCLUDE = "systemtap-runtime"
#: Seconds the last making of the root took in this process (None: it was
#: there already).
made_in: float | None = None


def trixie() -> UserRoot:
    """The store's trixie root, made when it is not there."""
    global made_in
    store = vm_store()
    try:
        found = load_root(sysroots_directory(store) / "trixie")
        if (found.root / "usr" / "bin" / "staprun").exists():
            return found
    except DamagedRoot:
        pass
    require(os.geteuid() == 0, "making the trixie root needs root (debootstrap)")
    require_program("debootstrap")
    cache = Path(os.environ.get("STAPSRV_CI_DEBOOTSTRAP") or
                 kept_directory("STAPSRV_CI_DEBOOTSTRAP", "debootstrap"))
    started = time.monotonic()
    done = subprocess.run([venv_bin("python"), "-m", "stapsrv.cli.sysroots", "--store",
                           str(store), "update", "trixie", "--cache-dir", str(cache),
                           "--include", INCLUDE],
                          capture_output=True, text=True, timeout=3600, cwd="/")
    if done.returncode != 0:
        raise AssertionError(f"making the trixie root failed: {done.stdout[-2000:]}"
                             f"{done.stderr[-3000:]}")
    made_in = time.monotonic() - started
    return load_root(sysroots_directory(store) / "trixie")
