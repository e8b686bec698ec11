"""What a server advertises: its records and their TXT strings."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from stapsrv.app import records
from stapsrv.app.interfaces import ServiceRecord
from stapsrv.app.records import service_records
from stapsrv.core.cmdline import ServerOption
from stapsrv.paths import translator_architecture

BASE = "Systemtap Compile Server on vm"


class RecordTests(TestCase):
    def test_one_record_per_release_txt_in_wire_order(self) -> None:
        records = service_records("vm", ["6.1.0-56-amd64", "6.18.44"], "x86_64", [
            ServerOption("-a", "x86_64"), ServerOption("-I", "/x"),
            ServerOption("-D", "A=1"), ServerOption("-B", "V=1 W=2"),
            ServerOption("-I", "/y y"), ServerOption("-R", "/rt")], 47001, "00:cc:24:a6:70")
        self.assertEqual(records, [
            ServiceRecord(BASE, 47001, (
                b"sysinfo=6.1.0-56-amd64 x86_64",
                b"optinfo=-R/rt -B'V=1 W=2' -DA=1 -I/x -I'/y y'",
                b"version=4.8", b"certinfo=00:cc:24:a6:70")),
            ServiceRecord(BASE, 47001, (
                b"sysinfo=6.18.44 x86_64",
                b"optinfo=-R/rt -B'V=1 W=2' -DA=1 -I/x -I'/y y'",
                b"version=4.8", b"certinfo=00:cc:24:a6:70")),
        ])

    def test_empty_optinfo_and_uname_arch(self) -> None:
        [record] = service_records("vm", ["r"], None, [], 1, "01")
        arch = translator_architecture(os.uname().machine)
        self.assertEqual(record.txt[:2], (f"sysinfo=r {arch}".encode(), b"optinfo="))

    def test_long_host_name_is_cut_to_63_bytes(self) -> None:
        name = records.service_name("h" * 100)
        self.assertEqual(len(name.encode()), 63)
        self.assertTrue(name.startswith("Systemtap Compile Server on hhh"))
        # Never half a UTF-8 character.
        self.assertLessEqual(len(records.service_name("\u00e9" * 40).encode()), 63)


class ArchitectureTests(TestCase):
    """A server that builds for arm64 too (issue 30) says so after each
    stored arm64 release: an arm64 client's ``-a arm64 -r REL`` (or an
    arm64 host's own release) compares ``REL arm64`` with ``sysinfo``."""

    def test_each_release_names_its_own_architecture(self) -> None:
        releases = ["6.1.0-56-amd64", "6.1.0-57-arm64", "6.1.0-57-amd64"]
        named = records.served_architectures(releases, ["6.1.0-56-amd64"], "x86_64",
                                             "amd64", ("arm64",))
        self.assertEqual(named, {"6.1.0-56-amd64": "x86_64", "6.1.0-57-arm64": "arm64",
                                 "6.1.0-57-amd64": "x86_64"})
        found = service_records("vm", list(named), "x86_64", [], 47001, "0a:0b",
                                architectures=named)
        self.assertEqual([record.txt[0] for record in found], [
            b"sysinfo=6.1.0-56-amd64 x86_64", b"sysinfo=6.1.0-57-arm64 arm64",
            b"sysinfo=6.1.0-57-amd64 x86_64"])
        self.assertEqual({record.txt[1:] for record in found},
                         {(b"optinfo=", b"version=4.8", b"certinfo=0a:0b")})

    def test_a_stored_release_it_does_not_build_for_is_left_out(self) -> None:
        named = records.served_architectures(["6.1.0-56-amd64", "6.1.0-57-arm64"], [],
                                             "x86_64", "amd64", ())
        self.assertEqual(named, {"6.1.0-56-amd64": "x86_64"})

    def test_a_given_release_keeps_the_servers_architecture_as_in_4_8(self) -> None:
        named = records.served_architectures(["6.1.0-57-arm64"], ["6.1.0-57-arm64"],
                                             "x86_64", "amd64", ())
        self.assertEqual(named, {"6.1.0-57-arm64": "x86_64"})


class MokInfoTests(TestCase):
    def test_mok_info_entries_come_last(self) -> None:
        [record] = records.service_records("vm", ["6.1.0-56-amd64"], "x86_64", [], 4711,
                                           "00:cc:24:a6:36", ["aa:bb", "cc:dd"])
        self.assertEqual(record.txt, (
            b"sysinfo=6.1.0-56-amd64 x86_64", b"optinfo=", b"version=4.8",
            b"certinfo=00:cc:24:a6:36", b"mok_info=aa:bb", b"mok_info=cc:dd"))
