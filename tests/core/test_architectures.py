"""Target architectures: a request's, a release's, the cross options."""

from __future__ import annotations

import unittest

from stapsrv.core.architectures import (
    ArchitectureError,
    cross_options,
    debian_name,
    parse_architectures,
    release_architecture,
    request_target,
)


class ReleaseArchitectureTests(unittest.TestCase):
    def test_flavours(self) -> None:
        self.assertEqual(release_architecture("6.1.0-41-arm64"), "arm64")
        self.assertEqual(release_architecture("6.1.0-41-cloud-amd64"), "amd64")
        self.assertEqual(release_architecture("6.12.57+deb13-arm64"), "arm64")
        self.assertIsNone(release_architecture("6.18.44-fc-v1300"))
        self.assertIsNone(release_architecture("/lib/modules/x/build"))

    def test_names(self) -> None:
        self.assertEqual(debian_name("x86_64"), "amd64")
        self.assertEqual(debian_name("arm64"), "arm64")
        self.assertIsNone(debian_name("sparc64"))


class ParseTests(unittest.TestCase):
    def test_words(self) -> None:
        self.assertEqual(parse_architectures(["arm64, arm64", ""]), ("arm64",))

    def test_unknown(self) -> None:
        with self.assertRaisesRegex(ArchitectureError, "'mips'.*arm64"):
            parse_architectures(["mips"])


class RequestTargetTests(unittest.TestCase):
    served = ("amd64", "arm64")

    def test_arm64(self) -> None:
        target = request_target("arm64", ["arm64"], "6.1.0-41-arm64", "amd64", self.served)
        self.assertEqual((target.architecture, target.refusal), ("arm64", None))

    def test_host(self) -> None:
        target = request_target("x86_64", [], "6.1.0-41-amd64", "amd64", ("amd64",))
        self.assertEqual(target.architecture, "amd64")

    def test_unknown_release_kept(self) -> None:
        target = request_target("x86_64", [], "6.18.44-fc-v1300", "amd64", ("amd64",))
        self.assertEqual(target.architecture, "amd64")

    def test_sysinfo_and_dash_a_disagree(self) -> None:
        refusal = request_target("x86_64", ["arm64"], "6.1.0-41-arm64", "amd64",
                                 self.served).refusal
        self.assertEqual(refusal, "Server: The request is for architecture 'x86_64' (its "
                         "sysinfo) but its -a names 'arm64'; they must agree.")

    def test_release_of_another_architecture(self) -> None:
        refusal = request_target("x86_64", [], "6.1.0-41-arm64", "amd64", self.served).refusal
        self.assertIn("'6.1.0-41-arm64' is an arm64 kernel", refusal or "")
        self.assertIn("-a arm64", refusal or "")

    def test_not_served(self) -> None:
        refusal = request_target("arm64", ["arm64"], "6.1.0-41-arm64", "amd64",
                                 ("amd64",)).refusal
        self.assertEqual(refusal, "Server: This server does not build modules for "
                         "architecture 'arm64'; it builds for: x86_64.")


class CrossOptionsTests(unittest.TestCase):
    def test_cross(self) -> None:
        self.assertEqual(cross_options("arm64", "amd64"),
                         [("-a", "arm64"), ("-B", "CROSS_COMPILE=aarch64-linux-gnu-")])
        self.assertEqual(cross_options("amd64", "amd64"), [])
