"""Another architecture's userland for the VM: Debian's ``busybox-static``
and ``systemtap-runtime`` (its ``staprun`` and ``stapio``) with the
libraries they load, from that architecture's ``.deb``s, fetched through
the kernel store's private apt for it and unpacked with ``dpkg-deb -x``
into ``STORE/.userland-ARCH/root`` once, kept for the next runs.  An
arm64 kernel in qemu runs the arm64 ``staprun`` of Debian's 4.8 client
family from there (:meth:`stapsrv.vm.initramfs.Staprun.in_root`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stapsrv.core.aptsources import parse_suites
from stapsrv.kernel.fetch import APT_CACHE, APT_GET, DPKG_DEB, FetchFailed, KernelFetcher
from stapsrv.kernel.privateapt import APT_DIRECTORY, AptSetupError, PrivateApt

#: What the initramfs takes from the other architecture: the shell, the
#: client's runtime and every library staprun and stapio load.
PACKAGES = ("busybox-static", "systemtap-runtime", "libc6", "libelf1", "zlib1g",
            "libzstd1", "libgcc-s1", "libnspr4", "libnss3", "libsqlite3-0", "libstdc++6",
            "liblzma5", "libbz2-1.0")
#: The top directories a merged /usr system links into ``usr/``.
MERGED = ("bin", "lib", "sbin")
#: Written once the root is whole.
COMPLETE = "complete"
#: The Debian suite whose ``systemtap-runtime`` is of a client family
#: other than bookworm's 4.8 (trixie's 5.1: 5.x staprun loads the modules
#: of any 5.x translator), and what its libraries are called there.
FAMILY_SUITES = {5: "trixie"}
RENAMED = {"trixie": {"libelf1": "libelf1t64"}}


def userland_directory(fetcher: KernelFetcher, architecture: str, family: int = 4) -> Path:
    suffix = "" if family == 4 else f"-{family}"
    return fetcher.store.directory / f".userland-{architecture}{suffix}"


async def ensure_userland(fetcher: KernelFetcher, architecture: str,
                          family: int = 4) -> Path:
    """The root of ``architecture``'s userland with the ``staprun`` of the
    client ``family`` (4: 4.x, 5: 5.x), fetched first if need be.  Raises
    FetchFailed."""
    directory = userland_directory(fetcher, architecture, family)
    if await fetcher.in_thread((directory / COMPLETE).is_file):
        return directory / "root"
    if architecture not in fetcher.foreign:
        raise FetchFailed(f"no apt configuration for {architecture}")
    if family not in (4, *FAMILY_SUITES):
        raise FetchFailed(f"no Debian suite known with a SystemTap {family}.x staprun")
    if fetcher.ready is not None:
        await fetcher.ready()
    options = fetcher.apt_options(architecture)
    packages: tuple[str, ...] = PACKAGES
    if family != 4:
        options = await _family_apt(fetcher, architecture, FAMILY_SUITES[family])
        renamed = RENAMED.get(FAMILY_SUITES[family], {})
        packages = await _with_libraries(fetcher, options, tuple(
            renamed.get(name, name) for name in PACKAGES))
    work = directory.with_name(f"{directory.name}.new-{os.getpid()}")
    download = work / "download"
    await fetcher.in_thread(_fresh, download)
    out, err, code = await fetcher.run(
        [APT_GET, *options, "download", "-q", *packages], cwd=download)
    if code != 0:
        raise FetchFailed(f"downloading the {architecture} userland failed: "
                          f"{err.decode(errors='replace').strip()[-300:]}")
    for deb in await fetcher.in_thread(lambda: sorted(download.glob("*.deb"))):
        out, err, code = await fetcher.run([DPKG_DEB, "-x", str(deb), str(work / "root")])
        if code != 0:
            raise FetchFailed(f"unpacking {deb.name} failed: "
                              f"{err.decode(errors='replace').strip()[-300:]}")
    await fetcher.in_thread(_settle, work, directory, packages)
    fetcher.log.info("Fetched the {architecture} userland for the VM into {directory}",
                     architecture=architecture, directory=str(directory))
    return directory / "root"


async def _family_apt(fetcher: KernelFetcher, architecture: str, suite: str) -> list[str]:
    """apt's options for ``suite``'s ``architecture`` packages: the store's
    private apt for them, its lists updated.  Raises FetchFailed."""
    apt = PrivateApt(fetcher.store.directory / f"{APT_DIRECTORY}-{architecture}-{suite}",
                     parse_suites([suite]), architecture)
    try:
        await fetcher.in_thread(apt.prepare)
    except AptSetupError as exc:
        raise FetchFailed(str(exc)) from None
    out, err, code = await fetcher.run([APT_GET, *apt.options(), "update", "-q"])
    if code != 0:
        raise FetchFailed(f"updating the {suite} {architecture} lists failed: "
                          f"{err.decode(errors='replace').strip()[-300:]}")
    return apt.options()


async def _with_libraries(fetcher: KernelFetcher, options: list[str],
                          packages: tuple[str, ...]) -> tuple[str, ...]:
    """``packages`` and every library package they depend on, through
    library packages (``lib*``; the first of alternatives): what staprun
    and stapio load, whatever the suite calls it (trixie's staprun loads
    libdebuginfod, which loads libcurl and its own).  Raises FetchFailed."""
    found, pending = list(packages), list(packages)
    while pending:
        out, err, code = await fetcher.run(
            [APT_CACHE, *options, "depends", "--no-recommends", "--no-suggests",
             "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *pending])
        if code != 0:
            raise FetchFailed(f"apt-cache depends failed: "
                              f"{err.decode(errors='replace').strip()[-300:]}")
        pending = [name for name in depended_libraries(out.decode(errors="replace"))
                   if name not in found]
        found += pending
    return tuple(found)


def depended_libraries(text: str) -> list[str]:
    """The library packages ``apt-cache depends`` says are needed (Depends
    and PreDepends; of alternatives, the first), each once, in order."""
    found: list[str] = []
    alternative = False
    for line in text.splitlines():
        words = line.split()
        if len(words) != 2 or words[0].lstrip("|") not in ("Depends:", "PreDepends:"):
            continue
        first = not alternative
        alternative = line.lstrip().startswith("|")
        name = words[1].split(":", 1)[0]
        if first and name.startswith("lib") and name not in found:
            found.append(name)
    return found


def _fresh(download: Path) -> None:
    """An empty work directory with ``download`` in it (blocking)."""
    shutil.rmtree(download.parent, ignore_errors=True)
    download.mkdir(parents=True)


def _settle(work: Path, directory: Path, packages: tuple[str, ...]) -> None:
    """The unpacked root in place, marked whole (blocking).  A suite with
    merged /usr (trixie) ships its files under ``usr/`` only: ``lib``,
    ``bin`` and ``sbin`` are made links into it, as its base-files does."""
    shutil.rmtree(work / "download")
    for name in MERGED:
        if not os.path.lexists(work / "root" / name) and (work / "root" / "usr" / name).is_dir():
            os.symlink(f"usr/{name}", work / "root" / name)
    (work / COMPLETE).write_text(" ".join(packages) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(work, directory)
