from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.compile.archive import (
    read_arguments,
    read_client_version,
    read_locale,
    read_target_release,
)
from stapsrv.compile.job import extract_request
from stapsrv.core.members import filter_locale, version_key
from tests.helpers.vectors import captured_requests


class RequestFileTests(TestCase):
    def unpack(self, name: str) -> Path:
        target = Path(self.mktemp())
        target.mkdir()
        extract_request(captured_requests()[name], target, 50000)
        return target

    def test_captured_trivial_request(self) -> None:
        request = self.unpack("01-trivial-p4")
        self.assertEqual(read_client_version(request), "4.8")
        self.assertEqual(read_target_release(request), "6.1.0-56-amd64")
        self.assertEqual(read_arguments(request), [
            b"-r6.1.0-56-amd64", b"-p4", b'-eprobe begin { println("hi"); exit() }'])
        self.assertEqual(read_locale(request).variables, {"LANG": "C.UTF-8"})

    def test_captured_locale_request(self) -> None:
        locale = read_locale(self.unpack("06-locale-LC_ALL"))
        self.assertEqual(locale.variables, {"LANG": "C.UTF-8", "LC_ALL": "C", "LC_MESSAGES": "C"})
        self.assertEqual(locale.complaints, ())

    def test_missing_files(self) -> None:
        empty = Path(self.mktemp())
        empty.mkdir()
        self.assertEqual(read_client_version(empty), "1.0")
        self.assertIsNone(read_target_release(empty))
        self.assertEqual(read_arguments(empty), [])

    def test_garbage_sysinfo(self) -> None:
        request = Path(self.mktemp())
        request.mkdir()
        (request / "sysinfo").write_bytes(b"\xff")
        self.assertIsNone(read_target_release(request))

    def test_arguments_stop_at_a_gap_and_a_nul(self) -> None:
        request = Path(self.mktemp())
        request.mkdir()
        (request / "argv1").write_bytes(b"-p4\0ignored")
        (request / "argv2").write_bytes(b"-e\xffprobe")
        (request / "argv4").write_bytes(b"never read")
        self.assertEqual(read_arguments(request), [b"-p4", b"-e\xffprobe"])


class LocaleTests(TestCase):
    def test_testsuite_cases(self) -> None:
        """server_locale.exp's three cases."""
        newline = filter_locale(b"LANG=en_US\n.utf8\n")
        self.assertEqual(newline.variables, {"LANG": "en_US"})
        self.assertEqual(newline.complaints,
                         ("Server: Localization key=value line '.utf8' cannot be parsed",))
        semicolon = filter_locale(b"LANG=en_US;.utf8\n")
        self.assertEqual(semicolon.variables, {})
        self.assertEqual(semicolon.complaints, (
            "Server: Localization value 'en_US;.utf8' contains illegal characters",))
        fancy = filter_locale(b"LANG=en_US.utf-8@toronto=test\n")
        self.assertEqual(fancy.variables, {"LANG": "en_US.utf-8@toronto=test"})

    def test_hostile_lines(self) -> None:
        result = filter_locale(b"LD_PRELOAD=/tmp/x.so\nLANG=$(reboot)\nLC_ALL=C\nLC_TIME=C")
        self.assertEqual(result.variables, {"LC_ALL": "C"})
        self.assertEqual(result.complaints, (
            "Server: Localization key 'LD_PRELOAD' not found in global list",
            "Server: Localization value '$(reboot)' contains illegal characters"))


class VersionTests(TestCase):
    def test_ordering(self) -> None:
        self.assertLess(version_key("1.6"), version_key("1.6.1"))
        self.assertLess(version_key("1.0"), version_key("1.6"))
        self.assertLess(version_key("1.10"), version_key("4.8"))
        self.assertEqual(version_key("4.8a"), version_key("4.8"))
