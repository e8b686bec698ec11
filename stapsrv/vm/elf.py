"""What a 64-bit little-endian ELF executable needs to run: its program
interpreter, the libraries it names (``DT_NEEDED``) and where it says to
look for them (``DT_RUNPATH``/``DT_RPATH``).  Sans-IO: bytes in."""

from __future__ import annotations

import struct

from attrs import frozen

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_RPATH = 15
DT_RUNPATH = 29


class NotElf(ValueError):
    """Not an ELF file this reader understands (64-bit little-endian)."""


@frozen
class Dependencies:
    interpreter: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...]


def dependencies(data: bytes) -> Dependencies:
    if data[:4] != b"\x7fELF":
        raise NotElf("no ELF magic")
    if len(data) < 64:
        raise NotElf("shorter than an ELF header")
    if data[4] != 2 or data[5] != 1:
        raise NotElf("not a 64-bit little-endian ELF file")
    try:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []
        dynamic: tuple[int, int] | None = None
        interpreter = None
        for index in range(phnum):
            kind, _, offset, vaddr, _, filesz, _, _ = struct.unpack_from(
                "<IIQQQQQQ", data, phoff + index * phentsize)
            if kind == PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif kind == PT_DYNAMIC:
                dynamic = (offset, filesz)
            elif kind == PT_INTERP:
                interpreter = data[offset:offset + filesz].rstrip(b"\0").decode()
        if dynamic is None:
            return Dependencies(interpreter, (), ())
        entries: list[tuple[int, int]] = []
        start, size = dynamic
        for at in range(start, start + size - 15, 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == DT_NULL:
                break
            entries.append((tag, value))
        strtab = next((value for tag, value in entries if tag == DT_STRTAB), None)
        if strtab is None:
            raise NotElf("a dynamic section without a string table")
        base = _file_offset(loads, strtab)

        def string(offset: int) -> str:
            end = data.index(b"\0", base + offset)
            return data[base + offset:end].decode()
        needed = tuple(string(value) for tag, value in entries if tag == DT_NEEDED)
        runpath = [string(value) for tag, value in entries if tag == DT_RUNPATH]
        rpath = [string(value) for tag, value in entries if tag == DT_RPATH]
    except (struct.error, IndexError, ValueError) as exc:  # ValueError: no NUL, bad UTF-8
        raise NotElf(f"a truncated or damaged ELF file ({exc})") from exc
    search = tuple(part for text in (runpath or rpath) for part in text.split(":") if part)
    return Dependencies(interpreter, needed, search)


def _file_offset(loads: list[tuple[int, int, int]], address: int) -> int:
    for vaddr, offset, filesz in loads:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    raise NotElf(f"address {address:#x} is in no loaded segment")
