"""Target architectures: a request's, a release's, the cross options."""

from __future__ import annotations

import unittest

from stapsrv.core.architectures import (
    advertised_architecture,
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


class AdvertisedArchitectureTests(unittest.TestCase):
    """What a stored release's Avahi sysinfo names after it: what a
    client of that kernel's architecture compares it with (its release,
    a blank, ``uname -m`` normalised by the translator or its ``-a``)."""

    def test_the_servers_own_kernels_name_its_default(self) -> None:
        for release in ("6.1.0-57-amd64", "6.1.0-57-cloud-amd64", "6.18.44"):
            self.assertEqual(advertised_architecture(release, "x86_64", "amd64", ("arm64",)),
                             "x86_64")

    def test_a_kernel_of_an_architecture_it_builds_for_names_that_one(self) -> None:
        self.assertEqual(advertised_architecture("6.1.0-57-arm64", "x86_64", "amd64",
                                                 ("arm64",)), "arm64")
        self.assertEqual(advertised_architecture("6.12.48+deb13-arm64", "x86_64", "amd64",
                                                 ("arm64",)), "arm64")

    def test_one_it_does_not_build_for_is_not_advertised(self) -> None:
        self.assertIsNone(advertised_architecture("6.1.0-57-arm64", "x86_64", "amd64", ()))
        self.assertIsNone(advertised_architecture("6.1.0-57-s390x", "x86_64", "amd64",
                                                  ("arm64",)))

    def test_the_servers_own_a_option_covers_its_architecture(self) -> None:
        # A server started with -a arm64 (a hand-made cross setup, as with
        # stap-serverd) says arm64 for arm64 kernels and for its own.
        self.assertEqual(advertised_architecture("6.1.0-57-arm64", "arm64", "amd64", ()),
                         "arm64")
        self.assertEqual(advertised_architecture("6.1.0-57-amd64", "arm64", "amd64", ()),
                         "arm64")
