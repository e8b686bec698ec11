"""Loading a module a real client got on its real kernel, booted in a VM,
with the product's runner (``python -m stapsrv.cli.kernels run``) run as
the server's user.

Kernel images the machine lacks are fetched into a kernel store kept
between runs (``STAPSRV_CI_VM_STORE``, default
``/var/cache/stapsrv-ci/vm-store`` when the tests run as root); without
it they are fetched again (70 MB each for -amd64, 27 MB for -cloud-amd64:
a few seconds).

What it costs (2 cores, TCG, another compile load beside): a run is about
10 s; tests/system/test_vm.py and test_verify.py together take about 7
minutes (19 tests, most of it compiles); the runs added to test_kernels,
test_symbols and test_debuginfo add about 10 s a module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from attrs import frozen

from tests.helpers import require, require_program
from tests.helpers.realserver import (
    Client,
    ClientKind,
    as_server_user,
    kept_directory,
    owned_directory,
    remove_tree,
    run,
    scratch_directory,
    server_environment,
    venv_bin,
)

QEMU = "qemu-system-x86_64"


@frozen
class VmRun:
    """What the module printed, what staprun said and its exit status."""

    output: str
    errors: str
    status: int | None
    summary: str
    console: str
    accelerator: str


def vm_store() -> Path:
    """The kernel store of the VM tests, owned by the server's user."""
    return kept_directory("STAPSRV_CI_VM_STORE", "vm-store")


def require_vm() -> None:
    require_program(QEMU)
    require(Path("/bin/busybox").exists(), "busybox-static is not installed (run 'make setup')")


def staprun_name(kind: ClientKind) -> str:
    """The runner's name for a client's staprun: ``host`` or its prefix."""
    if kind.staprun == "/usr/bin/staprun":
        return "host"
    return str(Path(kind.staprun).parent.parent)


def _handed_over(module: Path, directory: Path) -> Path:
    """``module`` and its signature, readable by the server's user."""
    copy = directory / module.name
    shutil.copyfile(module, copy)
    copy.chmod(0o644)
    signature = module.with_name(module.name + ".sgn")
    if signature.exists():
        shutil.copyfile(signature, directory / signature.name)
        (directory / signature.name).chmod(0o644)
    return copy


async def run_in_vm(module: Path, release: str, kind: ClientKind, *,
                    command: str | None = None, files: tuple[str, ...] = (),
                    group: str | None = None, signers: Path | None = None,
                    options: tuple[str, ...] = (), root: Path | None = None,
                    suites: str | None = None, store: Path | None = None) -> VmRun:
    """``module`` loaded with ``kind``'s own staprun on ``release`` (from
    the distribution ``root`` when given); ``suites``: the kernel image
    fetched through the store's private apt for those suites; ``store``:
    another kernel store than the VM tests' (its images)."""
    require_vm()
    base = scratch_directory("vm-")
    try:
        copy = _handed_over(module, base)
        argv = [venv_bin("python"), "-m", "stapsrv.cli.kernels", "--store",
                str(store or vm_store()),
                *(("--suites", suites) if suites else ()), "run", release, str(copy),
                "--staprun", str(root) if root else staprun_name(kind), "--json"]
        if root is None and not os.stat(kind.staprun).st_mode & 0o004:
            # 5.5 installs staprun mode 4110: the server's user cannot read
            # it; hand it a readable copy of the same program.
            program = base / "staprun"
            shutil.copyfile(kind.staprun, program)
            program.chmod(0o755)
            argv += ["--staprun-program", str(program)]
        if command is not None:
            argv += ["--command", command]
        for option in options:
            argv.append(f"--option={option}")
        for path in files:
            argv += ["--file", path]
        if group is not None:
            argv += ["--group", group]
        if signers is not None:
            argv += ["--signers", str(signers)]
        out, err, code = await run(as_server_user(argv), env=server_environment(base, "stapsrv"),
                                   cwd=base)
        text = out.decode(errors="replace").strip()
        if not text.startswith("{"):
            raise AssertionError(f"the VM runner failed (exit {code}):\n"
                                 f"{err.decode(errors='replace')}")
        found = json.loads(text.splitlines()[-1])
        return VmRun(found["output"], found["errors"], found["status"], found["summary"],
                     found["console"], found["accelerator"])
    finally:
        remove_tree(base)


async def trusted_signers(client: Client, server_spec: str) -> Path:
    """An NSS database in which the client trusts ``server_spec`` as a
    module signer, as ``stap --trust-servers=signer`` makes it on a client
    machine (run in a private mount namespace over the client's
    ``SYSCONFDIR/systemtap``, so the machine's own trust is not touched);
    a directory the server's user can read."""
    require(os.geteuid() == 0, "making a signer database needs root (a mount namespace)")
    unshare = require_program("unshare")
    target = owned_directory(client.dir / "signers")
    script = ('set -e; umask 022; spec=$1 stap=$2 confdir=$3 target=$4\n'
              'mount -t tmpfs -o mode=0755 stapsrv-test "$confdir/systemtap"\n'
              '"$stap" --use-server="$spec" --trust-servers=signer,all-users,no-prompt '
              '>/dev/null 2>&1\n'
              'cp "$confdir/systemtap/staprun/"* "$target/"\n'
              'chmod 0644 "$target/"*\n')
    out, err, code = await run(
        [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
         server_spec, client.kind.stap, client.kind.sysconfdir, str(target)],
        env=client.env(), cwd=client.cwd)
    if code != 0 or not any(target.iterdir()):
        raise AssertionError(f"the client did not make a signer database (exit {code}):\n"
                             f"{(out + err).decode(errors='replace')}")
    return target
