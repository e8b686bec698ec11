"""Kernel releases the Debian archive has but this machine has not
installed, for the kernel store's tests: computed from apt at run time,
never pinned (the archive moves the ABI at every point release)."""

from __future__ import annotations

import re
import subprocess

from stapsrv.paths import installed_releases
from tests.helpers import require

_RELEASE = re.compile(r"(\d+\.\d+\.\d+)-(\d+)-(.+)")


def in_archive(release: str) -> bool:
    """Whether apt knows ``linux-headers-<release>``."""
    result = subprocess.run(["apt-cache", "show", "--no-all-versions",
                             f"linux-headers-{release}"], capture_output=True, text=True)
    return result.returncode == 0 and "Package:" in result.stdout


def _newest_installed() -> tuple[str, int, str]:
    releases = [m for r in installed_releases() if (m := _RELEASE.fullmatch(r))]
    require(bool(releases), "no Debian kernel headers installed (run 'make setup')")
    newest = max(releases, key=lambda m: int(m.group(2)))
    return newest.group(1), int(newest.group(2)), newest.group(3)


def older_abi_release() -> str:
    """The plain flavour of the ABI just below the newest installed one
    that the archive has and that is not installed."""
    series, abi, flavour = _newest_installed()
    installed = set(installed_releases())
    for number in range(abi - 1, max(abi - 12, 0), -1):
        release = f"{series}-{number}-{flavour}"
        if release not in installed and in_archive(release):
            return release
    require(False, "the archive has no older ABI that is not installed")
    raise AssertionError


def cloud_release() -> str:
    """The -cloud- flavour of the newest installed ABI."""
    series, abi, flavour = _newest_installed()
    release = f"{series}-{abi}-cloud-{flavour}"
    require(release not in installed_releases() and in_archive(release),
            f"the archive has no {release} (or it is installed)")
    return release


def absent_releases() -> list[str]:
    """Every release of the newest installed series and flavour, in each
    of its flavours (plain, ``cloud-``, ``rt-``: the fetch policy's
    default), that the archive has and this machine has not installed,
    newest ABI first."""
    series, _, flavour = _newest_installed()
    listed = subprocess.run(["apt-cache", "pkgnames", f"linux-headers-{series}-"],
                            capture_output=True, text=True, check=True).stdout.split()
    wanted = re.compile(rf"linux-headers-({re.escape(series)}-(\d+)-(?:(?:cloud|rt)-)?"
                        rf"{re.escape(flavour)})")
    installed = set(installed_releases())
    found = sorted(((int(match.group(2)), match.group(1)) for name in listed
                    if (match := wanted.fullmatch(name)) and match.group(1) not in installed),
                   reverse=True)
    require(bool(found), f"the archive has no {series} release that is not installed")
    return [release for _, release in found]


def missing_release() -> str:
    """A release of the server's series that the archive cannot have."""
    series, abi, flavour = _newest_installed()
    return f"{series}-{abi + 900}-{flavour}"
