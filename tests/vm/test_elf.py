"""Reading what an ELF program loads: from hand-made files and from the
machine's own staprun."""

from __future__ import annotations

import struct
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.vm.elf import (
    DT_NEEDED,
    DT_RUNPATH,
    DT_STRTAB,
    PT_DYNAMIC,
    PT_INTERP,
    PT_LOAD,
    NotElf,
    dependencies,
)
from tests.helpers import require

VADDR = 0x400000


def make_elf(interpreter: str | None, needed: list[str], runpath: str | None = None) -> bytes:
    """A 64-bit little-endian ELF file with one loaded segment holding the
    string table, a dynamic section and (optionally) an interpreter."""
    strings = b"\0"
    offsets = []
    for name in [*needed, *([runpath] if runpath else [])]:
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    headers = 3 if interpreter else 2
    phoff = 64
    body = phoff + headers * 56
    strtab_at = body
    interp_at = strtab_at + len(strings)
    interp = (interpreter.encode() + b"\0") if interpreter else b""
    dynamic_at = interp_at + len(interp)
    entries = [(DT_NEEDED, offset) for offset in offsets[:len(needed)]]
    if runpath:
        entries.append((DT_RUNPATH, offsets[-1]))
    entries += [(DT_STRTAB, VADDR + strtab_at), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    end = dynamic_at + len(dynamic)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, 56,
                                 headers, 64, 0, 0)
    programs = struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0, VADDR, VADDR, end, end, 0x1000)
    programs += struct.pack("<IIQQQQQQ", PT_DYNAMIC, 6, dynamic_at, VADDR + dynamic_at,
                            VADDR + dynamic_at, len(dynamic), len(dynamic), 8)
    if interpreter:
        programs += struct.pack("<IIQQQQQQ", PT_INTERP, 4, interp_at, VADDR + interp_at,
                                VADDR + interp_at, len(interp), len(interp), 1)
    return header + programs + strings + interp + dynamic


class DependencyTests(TestCase):
    def test_interpreter_libraries_and_runpath(self) -> None:
        data = make_elf("/lib64/ld-linux-x86-64.so.2", ["libnss3.so", "libc.so.6"],
                        "$ORIGIN/../lib:/opt/x/lib")
        found = dependencies(data)
        self.assertEqual(found.interpreter, "/lib64/ld-linux-x86-64.so.2")
        self.assertEqual(found.needed, ("libnss3.so", "libc.so.6"))
        self.assertEqual(found.search, ("$ORIGIN/../lib", "/opt/x/lib"))

    def test_a_library_without_interpreter(self) -> None:
        found = dependencies(make_elf(None, ["libc.so.6"]))
        self.assertEqual((found.interpreter, found.needed, found.search),
                         (None, ("libc.so.6",), ()))

    def test_not_elf(self) -> None:
        self.assertRaises(NotElf, dependencies, b"#!/bin/sh\n")
        self.assertRaises(NotElf, dependencies, b"\x7fELF\x01\x01" + b"\0" * 60)
        self.assertRaises(NotElf, dependencies, make_elf("/lib/ld", ["libc.so.6"])[:140])
        self.assertRaises(NotElf, dependencies, b"\x7fELF")

    def test_strings_past_the_end_or_unterminated_are_damage(self) -> None:
        whole = make_elf(None, ["libc.so.6"])
        needed = struct.pack("<qQ", 1, 1)  # DT_NEEDED at string 1 (after the first NUL)
        self.assertIn(needed, whole)
        far = whole.replace(needed, struct.pack("<qQ", 1, 1 << 40))  # past the end
        self.assertRaises(NotElf, dependencies, far)
        unterminated = whole[:whole.rindex(b"libc.so.6") + 9]  # the name's NUL is gone
        self.assertRaises(NotElf, dependencies, unterminated)
        bad = whole.replace(b"libc.so.6", b"libc\xff\xfe.6")
        self.assertRaises(NotElf, dependencies, bad)

    def test_the_machines_staprun(self) -> None:
        staprun = Path("/usr/bin/staprun")
        require(staprun.exists(), "systemtap is not installed (run 'make setup')")
        found = dependencies(staprun.read_bytes())
        self.assertEqual(found.interpreter, "/lib64/ld-linux-x86-64.so.2")
        self.assertIn("libnss3.so", found.needed)
        self.assertIn("libc.so.6", found.needed)
