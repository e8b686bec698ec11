"""A small Debian archive on disk made with the real tools: kernel header
packages built by ``dpkg-deb``, indexed by ``apt-ftparchive`` and signed
with a key made for the test by ``gpg``, for apt to read through
``file:`` URIs exactly as it reads Debian's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import require_program


def _package(work: Path, name: str, version: str, files: dict[str, str | Path],
             depends: Sequence[str] = ()) -> Path:
    """``name_version_amd64.deb`` holding ``files`` (path: text, or path:
    link target given as a Path)."""
    root = work / "build" / name
    (root / "DEBIAN").mkdir(parents=True)
    control = [f"Package: {name}", f"Version: {version}", "Architecture: amd64",
               "Maintainer: stapsrv tests <tests@invalid>", "Section: kernel",
               "Priority: optional", f"Description: {name} for the kernel store's tests"]
    if depends:
        control.insert(3, "Depends: " + ", ".join(depends))
    (root / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
    for path, content in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            target.symlink_to(content)
        else:
            target.write_text(content)
    deb = work / "debs" / f"{name}_{version}_amd64.deb"
    deb.parent.mkdir(exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def kernel_packages(work: Path, release: str, version: str) -> list[Path]:
    """The three packages a release's build tree is made of, shaped as
    Debian's: the arch headers (their Makefile includes the common tree
    by absolute path; ``scripts`` links into the kbuild package), the
    common headers and kbuild."""
    abi = release.rsplit("-", 1)[0]
    common = f"linux-headers-{abi}-common"
    kbuild = f"linux-kbuild-{abi}"
    tree = f"/usr/src/linux-headers-{release}"
    headers = _package(work, f"linux-headers-{release}", version, {
        f"{tree}/Makefile": f"include /usr/src/{common}/Makefile\n",
        f"{tree}/.config": "CONFIG_MODULES=y\n",
        f"{tree}/scripts": Path(f"../../lib/{kbuild}/scripts"),
        f"/lib/modules/{release}/build": Path(tree)},
        depends=[f"{common} (= {version})", kbuild, "gcc-99"])
    return [headers,
            _package(work, common, version, {f"/usr/src/{common}/Makefile": "VERSION = 9\n"}),
            _package(work, kbuild, version,
                     {f"/usr/lib/{kbuild}/scripts/Makefile.build": "# kbuild\n"})]


class FakeArchive:
    """``root/dists/<suite>/{InRelease,main/binary-amd64/Packages}`` and
    ``root/pool``; :attr:`keyring` holds the key that signed them."""

    def __init__(self, base: Path) -> None:
        for program in ("dpkg-deb", "apt-ftparchive", "gpg"):
            require_program(program)
        self.base = base
        self.root = base / "archive"
        self.keyring = base / "archive-key.gpg"
        # Short: gpg-agent's socket lives there (a path of at most 107 bytes).
        self.gnupg = Path(tempfile.mkdtemp(prefix="stapsrv-gpg-"))
        self._gpg("--quick-generate-key", "stapsrv test archive <archive@invalid>",
                  "ed25519", "sign", "never")
        exported = self._gpg("--export")
        self.keyring.write_bytes(exported)

    def _gpg(self, *words: str, stdin: bytes | None = None) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "",
             *words], env=dict(os.environ, GNUPGHOME=str(self.gnupg)), input=stdin,
            check=True, capture_output=True).stdout

    def add_suite(self, suite: str, debs: Sequence[Path], signed: bool = True) -> None:
        """Publish ``debs`` as ``suite`` (signed by :attr:`keyring`'s key, or not
        at all); publishing a suite again adds ``debs`` to what it held (a
        new release appearing in it)."""
        pool = self.root / "pool" / suite
        pool.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            if not (pool / deb.name).exists():
                os.link(deb, pool / deb.name)
        binary = self.root / "dists" / suite / "main" / "binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        packages = subprocess.run(["apt-ftparchive", "packages", f"pool/{suite}"],
                                  cwd=self.root, check=True, capture_output=True).stdout
        (binary / "Packages").write_bytes(packages)
        for old in ("InRelease", "Release"):  # not indexed by the new Release
            (self.root / "dists" / suite / old).unlink(missing_ok=True)
        release = subprocess.run(
            ["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={suite}",
             "-o", f"APT::FTPArchive::Release::Codename={suite}",
             "-o", "APT::FTPArchive::Release::Components=main",
             "-o", "APT::FTPArchive::Release::Architectures=amd64",
             "release", "."], cwd=self.root / "dists" / suite, check=True,
            capture_output=True).stdout
        if signed:
            (self.root / "dists" / suite / "InRelease").write_bytes(
                self._gpg("--clearsign", "--output", "-", stdin=release))
        else:
            (self.root / "dists" / suite / "Release").write_bytes(release)

    def close(self) -> None:
        """End the key's gpg-agent and forget the key."""
        subprocess.run(["gpgconf", "--homedir", str(self.gnupg), "--kill", "gpg-agent"],
                       capture_output=True)
        shutil.rmtree(self.gnupg, ignore_errors=True)

    def uri(self) -> str:
        return f"file://{self.root}"
