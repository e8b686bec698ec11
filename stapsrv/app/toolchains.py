"""The toolchains a server answers with, found when it starts: the host's,
and those kept in its kernel store that run (each is checked by running
its translator's ``stap -V`` in the sandbox on its root).  A damaged one
is named in the log and left out; the others serve."""

from __future__ import annotations

import subprocess

from twisted.logger import Logger

from stapsrv.compile.sandbox import Sandbox, SandboxUnavailable
from stapsrv.config.values import ServerConfig
from stapsrv.kernel.store import store_directory
from stapsrv.kernel.sysroots import UserRoot, discover_roots
from stapsrv.kernel.toolchains import (
    Toolchain,
    discover,
    host_toolchain,
    ordered,
    toolchains_directory,
    translator_version,
)


def host_translator(stap: str) -> Toolchain:
    """The host's toolchain, its version from ``stap -V`` (blocking)."""
    try:
        done = subprocess.run([stap, "-V"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        version = translator_version(done.stdout + done.stderr)
    except (OSError, subprocess.TimeoutExpired):
        version = None
    return host_toolchain(version or "4.8")


def server_toolchains(config: ServerConfig, sandbox: Sandbox | None,
                      log: Logger) -> list[Toolchain]:
    """The host's toolchain first, then each one of the kernel store that
    runs (blocking: at start); none when there is no other than the
    host's (or no sandbox): every request goes to the host's translator."""
    directory = toolchains_directory(store_directory(config))
    found, damaged = discover(store_directory(config))
    if sandbox is None:
        if found:
            log.warn("Toolchains in {directory} are not used: they run in the translator "
                     "sandbox only (--no-sandbox)", directory=directory)
        return []
    for reason in damaged:
        log.error("Not using {reason}", reason=reason)
    working = []
    for toolchain in found:
        try:
            said = sandbox.check(system=toolchain.root, program=(toolchain.stap, "-V"))
        except SandboxUnavailable as exc:
            log.error("Not using toolchain {name}: its translator does not run in the "
                      "sandbox: {error}", name=toolchain.name, error=str(exc)[-500:])
            continue
        log.info("Toolchain {toolchain}: {root}, manifest {digest} ({said})",
                 toolchain=toolchain.describe(), root=toolchain.root,
                 digest=toolchain.digest, said=said.splitlines()[0] if said else "")
        working.append(toolchain)
    if not working:
        return []  # the host's alone: nothing to choose
    return ordered(host_translator(config.stap), working)


def server_user_roots(config: ServerConfig, log: Logger) -> list[UserRoot]:
    """The user-space roots of the kernel store, each named in the log
    (blocking: at start); a damaged one is named and left out."""
    found, damaged = discover_roots(store_directory(config))
    for reason in damaged:
        log.error("Not using user-space {reason}", reason=reason)
    for root in found:
        log.info("User-space root {name} (suite {suite}): {root}, manifest {digest}",
                 name=root.name, suite=root.suite, root=root.root, digest=root.digest)
    return found
