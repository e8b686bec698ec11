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

from stapsrv.kernel.fetch import APT_GET, DPKG_DEB, FetchFailed, KernelFetcher

#: What the initramfs takes from the other architecture: the shell, the
#: client's runtime and every library staprun and stapio load.
PACKAGES = ("busybox-static", "systemtap-runtime", "libc6", "libelf1", "zlib1g",
            "libzstd1", "libgcc-s1", "libnspr4", "libnss3", "libsqlite3-0", "libstdc++6",
            "liblzma5", "libbz2-1.0")
#: Written once the root is whole.
COMPLETE = "complete"


def userland_directory(fetcher: KernelFetcher, architecture: str) -> Path:
    return fetcher.store.directory / f".userland-{architecture}"


async def ensure_userland(fetcher: KernelFetcher, architecture: str) -> Path:
    """The root of ``architecture``'s userland, fetched first if need be.
    Raises FetchFailed."""
    directory = userland_directory(fetcher, architecture)
    if await fetcher.in_thread((directory / COMPLETE).is_file):
        return directory / "root"
    if architecture not in fetcher.foreign:
        raise FetchFailed(f"no apt configuration for {architecture}")
    if fetcher.ready is not None:
        await fetcher.ready()
    work = directory.with_name(f"{directory.name}.new-{os.getpid()}")
    download = work / "download"
    await fetcher.in_thread(_fresh, download)
    out, err, code = await fetcher.run(
        [APT_GET, *fetcher.apt_options(architecture), "download", "-q", *PACKAGES],
        cwd=download)
    if code != 0:
        raise FetchFailed(f"downloading the {architecture} userland failed: "
                          f"{err.decode(errors='replace').strip()[-300:]}")
    for deb in await fetcher.in_thread(lambda: sorted(download.glob("*.deb"))):
        out, err, code = await fetcher.run([DPKG_DEB, "-x", str(deb), str(work / "root")])
        if code != 0:
            raise FetchFailed(f"unpacking {deb.name} failed: "
                              f"{err.decode(errors='replace').strip()[-300:]}")
    await fetcher.in_thread(_settle, work, directory)
    fetcher.log.info("Fetched the {architecture} userland for the VM into {directory}",
                     architecture=architecture, directory=str(directory))
    return directory / "root"


def _fresh(download: Path) -> None:
    """An empty work directory with ``download`` in it (blocking)."""
    shutil.rmtree(download.parent, ignore_errors=True)
    download.mkdir(parents=True)


def _settle(work: Path, directory: Path) -> None:
    """The unpacked root in place, marked whole (blocking)."""
    shutil.rmtree(work / "download")
    (work / COMPLETE).write_text(" ".join(PACKAGES) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(work, directory)
