"""Toolchains: what a root's manifest says, a damaged root, the compiler a
kernel's headers call, and which toolchain answers which client and
kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from stapsrv.kernel import toolchains
from stapsrv.kernel.toolchains import (
    HOST,
    DamagedToolchain,
    Toolchain,
    choose,
    discover,
    host_paths,
    host_toolchain,
    installed_packages,
    kernel_compiler,
    kernel_version,
    load,
    manifest_text,
)
from stapsrv.paths import MODULES

STATUS = """\
Package: systemtap
Status: install ok installed
Architecture: amd64
Version: 5.6-1

Package: gcc-14
Status: install ok installed
Architecture: amd64
Version: 14.3.0-9
Description: a compiler
 with: a continuation line

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def make_root(directory: Path, compilers: tuple[str, ...] = ("gcc-12", "gcc-14"),
              manifest: bool = True) -> Path:
    """A toolchain directory with the files that make it serve."""
    root = directory / "root"
    for program in ("stap", "make", *compilers):
        path = root / "usr" / "bin" / program
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "usr" / "share" / "systemtap" / "runtime").mkdir(parents=True)
    if manifest:
        (directory / "manifest.json").write_text(manifest_text(
            directory.name, "forky", 1.0, {"systemtap": "5.6-1", "gcc-14": "14.3.0-9"}))
    return directory


HOST_48 = host_toolchain("4.8")


class ManifestTests(SynchronousTestCase):
    def test_installed_packages_from_dpkgs_status(self) -> None:
        admin = Path(self.mktemp())
        admin.mkdir()
        (admin / "status").write_text(STATUS)
        self.assertEqual(installed_packages(admin), {"systemtap": "5.6-1", "gcc-14": "14.3.0-9"})

    def test_cross_compilers_are_found_by_prefix(self) -> None:
        without = load(make_root(Path(self.mktemp()) / "forky"))
        self.assertFalse(without.has_cross_compiler("aarch64-linux-gnu-"))
        with_cross = load(make_root(Path(self.mktemp()) / "forky",
                                    ("gcc-12", "aarch64-linux-gnu-gcc-12")))
        self.assertTrue(with_cross.has_cross_compiler("aarch64-linux-gnu-"))
        self.assertTrue(with_cross.has_compiler("aarch64-linux-gnu-gcc-12"))
        self.assertFalse(with_cross.has_cross_compiler("x86_64-linux-gnu-"))

    def test_a_root_with_its_manifest_serves(self) -> None:
        found = load(make_root(Path(self.mktemp()) / "forky"))
        self.assertEqual((found.name, found.translator, found.family, found.suite),
                         ("forky", "5.6", 5, "forky"))
        self.assertEqual(dict(found.packages)["gcc-14"], "14.3.0-9")
        self.assertEqual(len(found.digest), 16)
        self.assertIsNone(found.newest_kernel)

    def test_the_digest_follows_the_manifest(self) -> None:
        directory = make_root(Path(self.mktemp()) / "forky")
        before = load(directory).digest
        (directory / "manifest.json").write_text(manifest_text(
            "forky", "forky", 2.0, {"systemtap": "5.6-2"}))
        self.assertNotEqual(load(directory).digest, before)

    def test_damaged_roots_say_what_is_wrong(self) -> None:
        base = Path(self.mktemp())
        no_manifest = make_root(base / "a", manifest=False)
        bad_manifest = make_root(base / "b")
        (bad_manifest / "manifest.json").write_text("{not json")
        no_stap = make_root(base / "c")
        (no_stap / "root" / "usr" / "bin" / "stap").unlink()
        no_systemtap = make_root(base / "d")
        (no_systemtap / "manifest.json").write_text(json.dumps({"suite": "forky",
                                                                 "packages": {}}))
        for directory, words in ((no_manifest, "no manifest"),
                                 (bad_manifest, "cannot be read"),
                                 (no_stap, "usr/bin/stap is missing"),
                                 (no_systemtap, "no systemtap package")):
            with self.assertRaises(DamagedToolchain) as raised:
                load(directory)
            self.assertIn(words, str(raised.exception))
            self.assertIn(f"toolchain {directory.name}", str(raised.exception))

    def test_discover_keeps_the_good_ones_and_names_the_damaged(self) -> None:
        store = Path(self.mktemp())
        place = toolchains.toolchains_directory(store)
        make_root(place / "forky")
        broken = make_root(place / "trixie")
        (broken / "root" / "usr" / "bin" / "stap").unlink()
        (place / "Not-a-name").mkdir()
        found, damaged = discover(store)
        self.assertEqual([toolchain.name for toolchain in found], ["forky"])
        self.assertEqual(len(damaged), 1)
        self.assertIn("toolchain trixie", damaged[0])
        self.assertEqual(discover(Path(self.mktemp())), ([], []))


class KernelTests(SynchronousTestCase):
    def tree(self, variables: str | None, config: str) -> Path:
        tree = Path(self.mktemp())
        tree.mkdir()
        if variables is not None:
            (tree / ".kernelvariables").write_text(variables)
        (tree / ".config").write_text(config)
        return tree

    def test_the_compiler_from_debians_kernel_variables(self) -> None:
        tree = self.tree("CCACHE = ccache\nCC = $(if $(X),$(CCACHE)) $(CROSS_COMPILE)gcc-12\n",
                         'CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"\n')
        self.assertEqual(kernel_compiler(tree), "gcc-12")
        tree = self.tree("CC = x86_64-linux-gnu-gcc-14\n", "")
        self.assertEqual(kernel_compiler(tree), "x86_64-linux-gnu-gcc-14")

    def test_the_compiler_from_the_configuration_else(self) -> None:
        tree = self.tree(None, 'CONFIG_CC_VERSION_TEXT="gcc-13 (Debian 13.1) 13.1"\n')
        self.assertEqual(kernel_compiler(tree), "gcc-13")
        self.assertIsNone(kernel_compiler(self.tree(None, "")))

    def test_the_installed_release_names_a_compiler_the_host_has(self) -> None:
        release = sorted(os.listdir(MODULES))[-1]
        compiler = kernel_compiler(MODULES / release / "build")
        self.assertIsNotNone(compiler)
        assert compiler is not None
        self.assertTrue(HOST_48.has_compiler(compiler), compiler)

    def test_kernel_versions(self) -> None:
        self.assertEqual(kernel_version("6.1.0-57-amd64"), (6, 1))
        self.assertEqual(kernel_version("6.12.95+deb12-amd64"), (6, 12))
        self.assertIsNone(kernel_version("weird"))
        tree = Path(self.mktemp()).absolute()
        (tree / "include" / "config").mkdir(parents=True)
        (tree / "include" / "config" / "kernel.release").write_text("7.2.1+deb14-amd64\n")
        self.assertEqual(kernel_version(str(tree), tree), (7, 2))

    def test_host_paths_of_the_installed_release(self) -> None:
        release = sorted(os.listdir(MODULES))[-1]
        tree = Path(os.path.realpath(MODULES / release / "build"))
        paths = host_paths(tree, release)
        self.assertIn(tree, paths)
        self.assertIn(Path("/usr/lib/modules") / release, paths)
        # Debian's headers: the common tree the Makefile includes, and the
        # kbuild directory their scripts and tools links lead to.
        self.assertTrue(any(path.name.endswith("-common") for path in paths), paths)
        self.assertTrue(any(path.name.startswith("linux-kbuild-") for path in paths), paths)
        self.assertTrue(all(Path("/usr") in path.parents for path in paths))


def forky(directory: Path) -> Toolchain:
    return load(make_root(directory / "forky"))


class ChooseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.forky = forky(Path(self.mktemp()))
        self.all = toolchains.ordered(HOST_48, [self.forky])

    def test_a_48_client_on_61_gets_the_host(self) -> None:
        self.assertIs(choose(self.all, "4.8", "6.1.0-57-amd64", (6, 1), "gcc-12"), HOST_48)

    def test_older_clients_are_of_48s_family(self) -> None:
        self.assertIs(choose(self.all, "1.6", "6.1.0-57-amd64", (6, 1), "gcc-12"), HOST_48)

    def test_a_5x_client_gets_the_5x_translator(self) -> None:
        for version in ("5.5", "5.1", "5.6"):
            self.assertIs(choose(self.all, version, "6.1.0-57-amd64", (6, 1), "gcc-12"),
                          self.forky)

    def test_a_48_client_on_612_is_told_why_and_what_would_work(self) -> None:
        answer = choose(self.all, "4.8", "6.12.95+deb12-amd64", (6, 12), "gcc-12")
        assert isinstance(answer, str)
        self.assertEqual(answer.count("\n"), 0)
        self.assertTrue(answer.startswith("Server: No toolchain of this server builds for "
                                          "kernel release '6.12.95+deb12-amd64' "), answer)
        self.assertIn("host (SystemTap 4.8) builds for kernels up to 6.1 only", answer)
        self.assertIn("forky (SystemTap 5.6) makes modules for SystemTap 5.x clients' staprun "
                      "(4.x's refuses them)", answer)
        self.assertTrue(answer.endswith("A SystemTap 5.x client would be served."), answer)

    def test_a_toolchain_without_the_headers_compiler_is_passed_over(self) -> None:
        answer = choose(self.all, "5.5", "6.12.9+deb13-amd64", (6, 12), "x86_64-linux-gnu-gcc-15")
        assert isinstance(answer, str)
        self.assertIn("forky (SystemTap 5.6) has no x86_64-linux-gnu-gcc-15, which the "
                      "kernel's headers call", answer)
        self.assertIn("No client would be", answer)

    def test_only_the_host(self) -> None:
        answer = choose([HOST_48], "5.5", "6.1.0-57-amd64", (6, 1), "gcc-12")
        assert isinstance(answer, str)
        self.assertIn("host (SystemTap 4.8) makes modules for SystemTap 4.x clients'", answer)
        self.assertIn("A SystemTap 4.x client would be served.", answer)

    def test_the_host_is_first(self) -> None:
        self.assertEqual(toolchains.ordered(HOST_48, [self.forky])[0].name, HOST)
