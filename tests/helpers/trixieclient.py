"""Debian trixie's own SystemTap client (stap 5.1 and its staprun), from a
debootstrapped trixie root, for the tests: it talks to a server over
loopback from a bubblewrap sandbox whose system is that root and whose
network is the machine's, with its own ``SYSTEMTAP_DIR`` (the tests'
state directory is the same path inside).

The root (minbase with ``systemtap``, ``systemtap-client``,
``systemtap-runtime``, ``libnss3-tools`` and ``dbus``, which avahi-daemon
needs but debootstrap does not pick) is made once with bookworm's
debootstrap, which knows trixie, and kept in
``/var/cache/stapsrv-ci/trixie-client`` (``STAPSRV_CI_CACHE``); the
packages it fetched are kept with the forky toolchain's
(``/var/cache/stapsrv-ci/debootstrap``).  It is made again when absent:
nothing depends on the cache.  Making it needs root: 114 s here from an
empty package cache (54 MB fetched; 2 min 50 s with the packages cached
but the machine under a load of 16), 331 MB.  The same finished-or-absent
rule as the package tests' roots (:func:`tests.helpers.nspawn._build`).
(The forky toolchain's maker, :func:`stapsrv.cli.roots.make_root`,
is not reused whole: it keeps a root that serves as a toolchain in a
kernel store; its mirror, debootstrap scripts and package cache are.)
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from stapsrv.cli.roots import MIRROR, SCRIPTS
from tests.helpers import require, require_program
from tests.helpers.nspawn import CACHE, _build
from tests.helpers.realserver import STATE, ClientKind, kept_directory

#: What the root holds besides minbase.
PACKAGES = ("systemtap", "systemtap-client", "systemtap-runtime", "libnss3-tools", "dbus")
SUITE = "trixie"
#: Empty in the sandbox (the root stays read-only); the tests' state
#: directory, under one of them, is the same path inside.
SCRATCH = ("/tmp", "/var/tmp")

#: Seconds the last making of the root took in this process (None: it was
#: there already).
made_in: float | None = None


def trixie_root() -> Path:
    """The trixie client's root, made first if need be."""
    global made_in
    directory = CACHE / "trixie-client"
    root = directory / "root"
    if (root / "usr" / "bin" / "stap").exists():
        return root
    require(os.geteuid() == 0, "making the trixie client's root needs root (debootstrap)")
    require_program("debootstrap")
    cache = kept_directory("STAPSRV_CI_DEBOOTSTRAP", "debootstrap")
    started = time.monotonic()
    _build(directory, [["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                        f"--cache-dir={cache}", SUITE, "{root}/root", MIRROR,
                        str(SCRIPTS / SUITE)]])
    made_in = time.monotonic() - started
    return root


def sandbox(root: Path) -> list[str]:
    """bubblewrap's words for running a program of ``root`` as its system
    (read-only), with the machine's network and the tests' state directory."""
    bwrap = require_program("bwrap")
    require(any(Path(top) in STATE.parents for top in SCRATCH),
            f"the tests' state directory {STATE} is not under {' or '.join(SCRATCH)}")
    return [bwrap, "--ro-bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
            *(word for top in SCRATCH for word in ("--tmpfs", top)),
            "--bind", str(STATE), str(STATE), "--die-with-parent"]


def in_root(argv: list[str], cwd: Path) -> list[str]:
    """``argv`` run in the trixie root, in ``cwd`` (under the tests' state
    directory)."""
    return [*sandbox(trixie_root()), "--chdir", str(cwd), *argv]


def _wrapper(root: Path) -> Path:
    """An executable that runs the root's ``stap`` with the arguments and
    environment it is given, in the caller's working directory."""
    path = root.parent / "stap"
    text = ("#!/bin/sh\n# trixie's stap, in its root (tests/helpers/trixieclient.py)\n"
            f'exec {shlex.join(sandbox(root))} --chdir "$PWD" /usr/bin/stap "$@"\n')
    if not path.exists() or path.read_text() != text:
        partial = path.with_name(f".stap.{os.getpid()}")
        partial.write_text(text)
        partial.chmod(0o755)
        os.replace(partial, path)
    return path


def trixie_client() -> ClientKind:
    """Trixie's client: its ``stap`` runs in the root, its ``staprun`` is
    the root's (the VM takes it from there)."""
    root = trixie_root()
    STATE.mkdir(parents=True, exist_ok=True)
    return ClientKind("5.1", str(_wrapper(root)), str(root / "usr" / "bin" / "staprun"),
                      "/etc")
