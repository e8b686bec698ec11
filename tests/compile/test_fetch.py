"""What the fetcher reads from apt and which releases it may fetch (the
fetch itself is tested against the real archive in tests/system/test_kernels)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.compile.fetch import allowed, build_packages, default_patterns, parse_show

SHOW = """Package: linux-headers-6.1.0-55-amd64
Source: linux (6.1.192-1)
Version: 6.1.192-1
Depends: linux-headers-6.1.0-55-common (= 6.1.192-1), linux-kbuild-6.1 (>= 6.1.192-1), linux-compiler-gcc-12-x86
Size: 1841140
Description: Header files for Linux 6.1.0-55-amd64
 This package provides the architecture-specific kernel header files
 Version: not a field

Package: linux-kbuild-6.1
Version: 6.1.192-3
Depends: libc6 (>= 2.34)
Size: 1567812
"""


class AptTests(TestCase):
    def test_show_stanzas(self) -> None:
        headers, kbuild = parse_show(SHOW)
        self.assertEqual((headers.name, headers.version, headers.size),
                         ("linux-headers-6.1.0-55-amd64", "6.1.192-1", 1841140))
        self.assertEqual((kbuild.name, kbuild.version), ("linux-kbuild-6.1", "6.1.192-3"))
        self.assertEqual(build_packages(headers),
                         ["linux-headers-6.1.0-55-common", "linux-kbuild-6.1"])
        self.assertEqual(parse_show(""), [])


class PolicyTests(TestCase):
    def test_default_is_the_servers_series_and_architecture(self) -> None:
        patterns = default_patterns("amd64", ["6.1.0-56-amd64", "6.1.0-57-amd64",
                                              "6.18.44-fc-v657"])
        self.assertEqual(patterns, ("6.1.0-*-amd64", "6.1.0-*-cloud-amd64",
                                    "6.1.0-*-rt-amd64"))
        self.assertTrue(allowed("6.1.0-55-amd64", patterns))
        self.assertTrue(allowed("6.1.0-57-cloud-amd64", patterns))
        self.assertFalse(allowed("5.10.0-30-amd64", patterns))
        self.assertFalse(allowed("6.1.0-55-arm64", patterns))
        self.assertEqual(default_patterns("arm64", ["6.1.0-3-arm64"])[0], "6.1.0-*-arm64")

    def test_names_that_are_not_releases_are_never_fetched(self) -> None:
        for name in ("-oDebug::pkgProblemResolver=1", "../x-amd64", "6.1.0-1-amd64 x"):
            self.assertFalse(allowed(name, ("*",)), name)
