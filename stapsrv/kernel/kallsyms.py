"""A kernel's symbol table, read from its boot image.

Debian's ``linux-image`` packages ship a placeholder ``System.map`` (the
real one is in the 860 MB ``-dbg`` package), but the kernel image itself
carries the table behind ``/proc/kallsyms``.  This module finds that table
in a ``vmlinuz`` and writes it as a ``System.map``: the translator reads
the names of its function symbols (types ``T``, ``t``, ``W``), which is
what the usual remedy, copying ``/proc/kallsyms`` to ``/boot``, gives it.

The kallsyms tables (``scripts/kallsyms.c`` in the kernel) are found by
their own structure, not by symbol, since the image has no symbol table:

- ``kallsyms_token_table``: 256 NUL-terminated strings, among them the
  digits ``0`` to ``9`` at indexes 0x30 to 0x39, followed by
  ``kallsyms_token_index``: 256 little-endian u16 offsets of those strings;
- ``kallsyms_num_syms`` (u32, 8-aligned; 4-aligned with the names in the
  next word in 7.x kernels) and ``kallsyms_names`` (a length,
  one byte or two with the top bit set, then that many token indexes per
  symbol; the first character is the symbol's type), and right after them
  ``kallsyms_markers`` (u32 or u64: the offset of every 256th name);
- ``kallsyms_offsets`` (s32 per symbol) and ``kallsyms_relative_base``
  (u64), before ``kallsyms_num_syms`` or after the token index depending
  on the kernel version; in 7.x kernels the offsets (after the token
  index) count from their own place, with no base.

Sans-IO apart from :func:`main`, which the server runs as a child process
(``python3 -m stapsrv.kernel.kallsyms VMLINUZ SYSTEM.MAP``) so that the
decompressed image (about 65 MB) never lives in the server.
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from attrs import frozen

#: The most a decompressed image may be (a bookworm amd64 one is 66 MB).
MAX_IMAGE = 512 << 20
#: How far before the token table the names may start.
_NAMES_REACH = 64 << 20
_DIGITS = b"\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
_TYPES = frozenset(b"AaBbDdGgRrSsTtVvWwNnUu?")
_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_ZSTD = b"\x28\xb5\x2f\xfd"
_LZ4_BLOCK = 8 << 20
_MIN_SYMBOLS = 1000
_MAX_SYMBOLS = 4_000_000


class KallsymsError(Exception):
    """The image holds no symbol table this module can read (one line)."""


@frozen
class Symbol:
    address: int
    kind: str
    name: str


def kernel_image(vmlinuz: bytes) -> bytes:
    """The kernel inside a boot image: an x86 bzImage's payload, or a
    whole-file compressed image (arm64's gzip), decompressed; anything
    else as it is."""
    if len(vmlinuz) > 0x250 and vmlinuz[0x202:0x206] == b"HdrS":
        setup_sectors = vmlinuz[0x1F1] or 4
        start = (setup_sectors + 1) * 512
        offset, length = struct.unpack_from("<II", vmlinuz, 0x248)
        payload = vmlinuz[start + offset:start + offset + length]
        if not payload:
            raise KallsymsError("the bzImage has no payload")
        return decompress(payload)
    return decompress(vmlinuz, raw_ok=True)


def decompress(data: bytes, raw_ok: bool = False) -> bytes:
    """``data`` decompressed by its magic number (xz, lzma, gzip, bzip2,
    LZ4's legacy frames, zstd), at most :data:`MAX_IMAGE` bytes."""
    if data.startswith(b"\xfd7zXZ\x00"):
        return _bounded(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress, data)
    if data.startswith(b"\x5d\x00\x00"):
        return _bounded(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress, data)
    if data.startswith(b"\x1f\x8b"):
        return _bounded(zlib.decompressobj(wbits=31).decompress, data)
    if data.startswith(b"BZh"):
        return _bounded(bz2.BZ2Decompressor().decompress, data)
    if data.startswith(_LZ4_LEGACY):
        return _lz4_legacy(data)
    if data.startswith(_ZSTD):
        return _zstd(data)
    if raw_ok:
        return data
    raise KallsymsError(f"the image's compression is unknown (magic {data[:4].hex()})")


def _bounded(decompress: Callable[[bytes, int], bytes], data: bytes) -> bytes:
    try:
        out = decompress(data, MAX_IMAGE + 1)
    except (lzma.LZMAError, OSError, zlib.error, EOFError) as exc:
        raise KallsymsError(f"the image does not decompress: {exc}") from None
    if len(out) > MAX_IMAGE:
        raise KallsymsError(f"the image is larger than {MAX_IMAGE >> 20} MiB decompressed")
    return out


def _zstd(data: bytes) -> bytes:
    """The first zstd frame (Debian's kernels since trixie); the kernel's
    size trailer after it is left alone."""
    import zstandard

    try:
        size = zstandard.get_frame_parameters(data).content_size
        if size != zstandard.CONTENTSIZE_UNKNOWN and size > MAX_IMAGE:
            raise KallsymsError(f"the image is larger than {MAX_IMAGE >> 20} MiB decompressed")
        # Past the bound, an unsized frame fails ("did not decompress full frame").
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_IMAGE,
                                                      allow_extra_data=True)
    except zstandard.ZstdError as exc:
        raise KallsymsError(f"the image does not decompress: {exc}") from None
    if not out:
        raise KallsymsError("the image does not decompress: an empty zstd frame")
    return out


def _lz4_legacy(data: bytes) -> bytes:
    """LZ4's legacy frames (Debian's cloud kernels): after the magic,
    blocks of a u32 compressed size and that many bytes, each 8 MiB
    decompressed but the last; the kernel's own u32 trailer ends it."""
    import lz4.block  # type: ignore[import-untyped]

    out = bytearray()
    position = len(_LZ4_LEGACY)
    while position + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, position)
        if size == 0 or position + 4 + size > len(data) or data[position:position + 4] == _LZ4_LEGACY:
            break
        try:
            out += lz4.block.decompress(data[position + 4:position + 4 + size],
                                        uncompressed_size=_LZ4_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise KallsymsError(f"the image does not decompress: {exc}") from None
        if len(out) > MAX_IMAGE:
            raise KallsymsError(f"the image is larger than {MAX_IMAGE >> 20} MiB decompressed")
        position += 4 + size
    if not out:
        raise KallsymsError("the image's LZ4 data is empty")
    return bytes(out)


def read_kallsyms(image: bytes) -> list[Symbol]:
    """Every symbol of the image's kallsyms tables, in address order."""
    tokens, table, index = _token_table(image)
    count, names_at, names = _names(image, tokens, table)
    addresses = _addresses(image, count, names_at, index)
    return [Symbol(address, name[0], name[1:]) for address, name in zip(addresses, names)]


def _token_table(image: bytes) -> tuple[list[str], int, int]:
    """The 256 tokens, and where the token table and its index are."""
    hit = image.find(_DIGITS)
    while hit != -1:
        digit_zero = hit + 1
        found = _index_after(image, digit_zero)
        if found is not None:
            return found
        hit = image.find(_DIGITS, hit + 1)
    raise KallsymsError("the image has no kallsyms token table")


def _index_after(image: bytes, digit_zero: int) -> tuple[list[str], int, int] | None:
    """The token table holding the digit tokens at ``digit_zero``, and its
    index, which follows it within 64 KiB."""
    for at in range(digit_zero & ~1, min(digit_zero + 0x10000, len(image) - 512), 2):
        if image[at:at + 2] != b"\0\0":
            continue
        index = struct.unpack_from("<256H", image, at)
        table = digit_zero - index[0x30]
        if table < 0 or table + index[255] >= at:
            continue
        if any(index[i] >= index[i + 1] for i in range(255)):
            continue
        tokens = []
        for i in range(256):
            start = table + index[i]
            end = table + index[i + 1] - 1 if i < 255 else image.find(b"\0", start, at)
            if end < start or image[end] != 0 or b"\0" in image[start:end]:
                break
            tokens.append(image[start:end].decode("latin-1"))
        else:
            if tokens[0x30] == "0" and tokens[0x39] == "9":
                return tokens, table, at
    return None


def _names(image: bytes, tokens: list[str], table: int) -> tuple[int, int, list[str]]:
    """The symbol count, where the names start, and the names (type first)."""
    types = {index for index, token in enumerate(tokens) if token and ord(token[0]) in _TYPES}
    for at in range(table & ~3, max(0, table - _NAMES_REACH), -4):
        count, after = struct.unpack_from("<II", image, at)
        if not _MIN_SYMBOLS < count < _MAX_SYMBOLS:
            continue
        # The names follow the count at the next 8-byte boundary, or (7.x)
        # in the next word.
        for start in ((at + 8,) if at % 8 == 0 and after == 0 else ()) + (at + 4,):
            first = image[start]
            if first == 0 or first & 0x80 or image[start + 1] not in types:
                continue
            decoded = _decode_names(image, tokens, start, count, table)
            if decoded is not None:
                return count, at, decoded
    raise KallsymsError("the image has no kallsyms name table")


def _decode_names(image: bytes, tokens: list[str], start: int, count: int,
                  limit: int) -> list[str] | None:
    """The ``count`` names from ``start``, when the markers after them agree."""
    names = []
    markers = []
    position = start
    for number in range(count):
        if number % 256 == 0:
            markers.append(position - start)
        if position >= limit:
            return None
        length = image[position]
        position += 1
        if length & 0x80:
            length = (length & 0x7F) | (image[position] << 7)
            position += 1
        if length == 0 or position + length > limit:
            return None
        name = "".join([tokens[byte] for byte in image[position:position + length]])
        if not name or ord(name[0]) not in _TYPES:
            return None
        names.append(name)
        position += length
    for after in sorted({(position + 7) & ~7, (position + 3) & ~3}):  # 7.x: 4-aligned
        for width in ("I", "Q"):
            if list(struct.unpack_from(f"<{len(markers)}{width}", image, after)) == markers:
                return names
    return None


def _addresses(image: bytes, count: int, names_at: int, index: int) -> list[int]:
    """Every symbol's address: the offsets and relative base sit before
    the symbol count, or (newer kernels) after the token index."""
    for offsets_at in ((names_at - 8 - 4 * count) & ~7, (index + 512 + 7) & ~7):
        if offsets_at < 0 or offsets_at + 4 * count + 16 > len(image):
            continue
        offsets = struct.unpack_from(f"<{count}i", image, offsets_at)
        base_at = (offsets_at + 4 * count + 7) & ~7
        (base,) = struct.unpack_from("<Q", image, base_at)
        if base == 0:
            base = _relocated_base(image, base_at)
        # With absolute per-CPU symbols (x86_64), non-negative offsets are
        # addresses and negative ones count down from the base: then the
        # kernel's own symbols are negative.  Otherwise every offset is
        # unsigned from the base.
        readings = [[base + (offset & 0xFFFFFFFF) for offset in offsets]]
        if min(offsets) < 0:
            readings.insert(0, [offset if offset >= 0 else base - 1 - offset
                                for offset in offsets])
        for addresses in readings:
            if _ascending(addresses) and addresses[-1] > addresses[0]:
                return addresses
    relative = _place_relative(image, count, index)
    if relative is not None:
        return relative
    raise KallsymsError("the image's kallsyms addresses are not where they were expected")


def _place_relative(image: bytes, count: int, index: int) -> list[int] | None:
    """7.x kernels: each offset, right after the token index, counts from
    its own place (no relative base); the place's address comes from the
    ELF image's program headers."""
    offsets_at = (index + 512 + 3) & ~3
    place = _elf_address(image, offsets_at)
    if place is None or offsets_at + 4 * count > len(image):
        return None
    offsets = struct.unpack_from(f"<{count}i", image, offsets_at)
    addresses = [(place + 4 * number + offset) & 0xFFFFFFFFFFFFFFFF
                 for number, offset in enumerate(offsets)]
    return addresses if _ascending(addresses) and addresses[-1] > addresses[0] else None


def _elf_address(image: bytes, offset: int) -> int | None:
    """The address a 64-bit little-endian ELF image loads its byte at
    ``offset`` to (None: not ELF, or no loaded segment holds it)."""
    if image[:6] != b"\x7fELF\x02\x01":
        return None
    phoff, = struct.unpack_from("<Q", image, 0x20)
    size, number = struct.unpack_from("<HH", image, 0x36)
    for at in range(phoff, phoff + size * number, size):
        kind, _, start, address, _, length = struct.unpack_from("<IIQQQQ", image, at)
        if kind == 1 and start <= offset < start + length:
            return int(address + offset - start)
    return None


#: An ``Elf64_Rela``'s ``r_info`` for R_AARCH64_RELATIVE (1027).
_AARCH64_RELATIVE = struct.pack("<Q", 1027)
_TWO_MB = (2 << 20) - 1


def _relocated_base(image: bytes, base_at: int) -> int:
    """The relative base of a relocatable arm64 ``Image``, where the word
    is 0 and the kernel fills it at boot from its ``.rela.dyn``: the
    addend of the R_AARCH64_RELATIVE entry whose target is that word
    (at link address K + ``base_at``, K the kernel's 2 MB aligned start in
    the top of the address space, the base a little above K).  0 when
    there is none."""
    position = image.find(_AARCH64_RELATIVE)
    while position >= 8:
        target, = struct.unpack_from("<Q", image, position - 8)
        start = target - base_at
        if start >> 48 == 0xFFFF and start & _TWO_MB == 0 and position + 16 <= len(image):
            addend, = struct.unpack_from("<Q", image, position + 8)
            if 0 <= addend - start < (64 << 20):
                return int(addend)
        position = image.find(_AARCH64_RELATIVE, position + 1)
    return 0


def _ascending(values: Sequence[int]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:]))


def system_map(symbols: Iterable[Symbol]) -> Iterator[str]:
    """``System.map`` lines, addresses as wide as the architecture's."""
    listed = list(symbols)
    width = 16 if any(symbol.address > 0xFFFFFFFF for symbol in listed) else 8
    for symbol in listed:
        yield f"{symbol.address:0{width}x} {symbol.kind} {symbol.name}\n"


def write_system_map(vmlinuz: Path, output: Path) -> int:
    """Write the map of ``vmlinuz`` to ``output`` (atomically); the number
    of function symbols in it."""
    symbols = read_kallsyms(kernel_image(vmlinuz.read_bytes()))
    functions = sum(1 for symbol in symbols if symbol.kind in "TtWw")
    if not functions:
        raise KallsymsError("the image's symbol table has no functions")
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", encoding="latin-1") as stream:
        stream.writelines(system_map(symbols))
    os.replace(partial, output)
    return functions


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 2:
        print("usage: python3 -m stapsrv.kernel.kallsyms VMLINUZ SYSTEM.MAP", file=sys.stderr)
        return 2
    try:
        functions = write_system_map(Path(arguments[0]), Path(arguments[1]))
    except (KallsymsError, OSError, struct.error, IndexError) as exc:
        print(f"{arguments[0]}: {exc}", file=sys.stderr)
        return 1
    print(f"{functions} function symbols")
    return 0


if __name__ == "__main__":
    sys.exit(main())
