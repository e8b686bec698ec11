"""The System.map read from a kernel image's kallsyms tables.

The images here are built by a small encoder of the tables' format, in the
layouts kernels use (offsets before the names as in Debian's 6.1, after the
token index as in later kernels), inside the containers Debian's images
come in (an x86 bzImage with an xz payload, a gzip file as on arm64, LZ4's
legacy frames as in the cloud flavour).  The real images are read in
tests/system/test_debuginfo.py, against the real System.map."""

from __future__ import annotations

import gzip
import lzma
import random
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
from twisted.trial.unittest import TestCase

from stapsrv.kernel import kallsyms
from stapsrv.kernel.kallsyms import (
    KallsymsError,
    Symbol,
    kernel_image,
    main,
    read_kallsyms,
    system_map,
)

BASE = 0xFFFFFFFF81000000


def sample_symbols(count: int = 3000, seed: int = 7) -> list[Symbol]:
    rng = random.Random(seed)
    percpu = [Symbol(0x1000 * i, "A", f"percpu_thing_{i}") for i in range(20)]
    words = ["vfs", "read", "write", "sys", "do", "page", "irq", "tcp", "inode", "lock",
             "x64", "alloc", "free", "init", "exit", "ext4", "net", "sched"]
    text = []
    address = BASE
    for i in range(count):
        kind = rng.choice("TTTttWDdBbRr")
        name = "_".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + f"{i}"
        if i == 0:
            kind, name = "T", "_text"
        elif i % 997 == 0:
            name = "long_" + "x" * 150 + str(i)  # a two-byte length
        text.append(Symbol(address, kind, name))
        address += rng.randint(0, 64)
    return percpu + text


def _tokens(names: Sequence[str]) -> list[str]:
    used = sorted({character for name in names for character in name} | set("0123456789"))
    tokens: list[str] = [""] * 256
    for character in used:
        tokens[ord(character)] = character
    pairs = Counter(name[i:i + 2] for name in names for i in range(len(name) - 1))
    free = [index for index in range(1, 256) if not tokens[index]]
    for index, (pair, _) in zip(free, pairs.most_common(len(free))):
        tokens[index] = pair
    return tokens


def _encode(name: str, tokens: list[str]) -> bytes:
    codes = {token: index for index, token in enumerate(tokens) if token}
    out = bytearray()
    i = 0
    while i < len(name):
        if name[i:i + 2] in codes and len(name[i:i + 2]) == 2:
            out.append(codes[name[i:i + 2]])
            i += 2
        else:
            out.append(codes[name[i]])
            i += 1
    return bytes(out)


def _align(data: bytearray, junk: bytes = b"\0") -> None:
    while len(data) % 8:
        data += junk


def build_tables(symbols: Sequence[Symbol], offsets_after: bool = False,
                 absolute_percpu: bool = True, wide_markers: bool = False) -> bytes:
    """The kallsyms tables of ``symbols``, amid other data, as a kernel
    image holds them."""
    names = [symbol.kind + symbol.name for symbol in symbols]
    tokens = _tokens(names)
    if absolute_percpu:
        offsets = [s.address if s.address < BASE else BASE - 1 - s.address for s in symbols]
    else:
        offsets = [(s.address - BASE) & 0xFFFFFFFF for s in symbols]
    encoded = bytearray()
    markers = []
    for number, name in enumerate(names):
        if number % 256 == 0:
            markers.append(len(encoded))
        code = _encode(name, tokens)
        if len(code) > 127:
            encoded += bytes([0x80 | (len(code) & 0x7F), len(code) >> 7])
        else:
            encoded.append(len(code))
        encoded += code
    rng = random.Random(len(symbols))
    image = bytearray(rng.randbytes(4096))
    _align(image)

    def offset_table() -> None:
        _align(image)
        image.extend(struct.pack(f"<{len(offsets)}{'I' if not absolute_percpu else 'i'}",
                                 *offsets))
        _align(image)
        image.extend(struct.pack("<Q", BASE))

    if not offsets_after:
        offset_table()
    _align(image)
    image.extend(struct.pack("<II", len(symbols), 0))
    image.extend(encoded)
    _align(image)
    image.extend(struct.pack(f"<{len(markers)}{'Q' if wide_markers else 'I'}", *markers))
    image.extend(rng.randbytes(3 * len(symbols)))  # kallsyms_seqs_of_names
    _align(image)
    index = []
    table = bytearray()
    for token in tokens:
        index.append(len(table))
        table += token.encode("latin-1") + b"\0"
    image.extend(table)
    _align(image)
    image.extend(struct.pack("<256H", *index))
    if offsets_after:
        offset_table()
    image.extend(rng.randbytes(4096))
    return bytes(image)


def build_place_relative(symbols: Sequence[Symbol]) -> bytes:
    """A 7.x kernel's ELF image: the count 4-aligned with the names in the
    next word, markers 4-aligned, and after the token index each offset
    counting from its own place (no base); one loaded segment maps the
    file from offset 0 to BASE."""
    names = [symbol.kind + symbol.name for symbol in symbols]
    tokens = _tokens(names)
    encoded, markers = bytearray(), []
    for number, name in enumerate(names):
        if number % 256 == 0:
            markers.append(len(encoded))
        code = _encode(name, tokens)
        encoded += (bytes([0x80 | (len(code) & 0x7F), len(code) >> 7]) if len(code) > 127
                    else bytes([len(code)])) + code
    header = bytearray(b"\x7fELF\x02\x01\x01" + bytes(0x40 - 7))
    struct.pack_into("<Q", header, 0x20, 0x40)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    image = header + bytearray(56) + bytearray(random.Random(5).randbytes(1004))
    image.extend(struct.pack("<I", len(symbols)))  # 4-aligned, names next
    image.extend(encoded)
    while len(image) % 4:
        image.append(0)
    image.extend(struct.pack(f"<{len(markers)}I", *markers))
    index, table = [], bytearray()
    for token in tokens:
        index.append(len(table))
        table += token.encode("latin-1") + b"\0"
    image.extend(table)
    while len(image) % 4:
        image.append(0)
    image.extend(struct.pack("<256H", *index))
    start = len(image)
    image.extend(struct.pack(f"<{len(symbols)}i", *(
        symbol.address - (BASE + start + 4 * number) for number, symbol in enumerate(symbols))))
    image.extend(bytes(4096))
    struct.pack_into("<IIQQQQ", image, 0x40, 1, 5, 0, BASE, 0, len(image))
    return bytes(image)


def bzimage(payload: bytes) -> bytes:
    """An x86 boot image: setup sectors with the header, then the payload."""
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + bytes(0x100) + payload + struct.pack("<I", 1 << 26)


def lz4_legacy(data: bytes) -> bytes:
    out = bytearray(b"\x02\x21\x4c\x18")
    for start in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[start:start + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def zstd_kernel(data: bytes) -> bytes:
    """A zstd frame with the kernel's u32 size trailer after it (trixie)."""
    import zstandard
    return zstandard.ZstdCompressor(level=3).compress(data) + struct.pack("<I", len(data))


class ReadTests(TestCase):
    def test_symbols_come_back_in_address_order_with_their_types(self) -> None:
        symbols = sample_symbols()
        self.assertEqual(read_kallsyms(build_tables(symbols)), symbols)

    def test_every_layout_of_the_tables(self) -> None:
        symbols = sample_symbols(2000, seed=3)
        for offsets_after in (False, True):
            for absolute_percpu in (False, True):
                for wide in (False, True):
                    shown = (offsets_after, absolute_percpu, wide)
                    listed = symbols if absolute_percpu else symbols[20:]
                    image = build_tables(listed, offsets_after, absolute_percpu, wide)
                    self.assertEqual(read_kallsyms(image), listed, shown)

    def test_place_relative_offsets_of_7x_kernels(self) -> None:
        symbols = [symbol for symbol in sample_symbols(2000, seed=4) if symbol.address >= BASE]
        self.assertGreater(len(symbols), 1500)
        self.assertEqual(read_kallsyms(build_place_relative(symbols)), symbols)

    def test_every_container(self) -> None:
        symbols = sample_symbols(1500)
        tables = build_tables(symbols)
        for image in (bzimage(lzma.compress(tables, format=lzma.FORMAT_XZ)),
                      bzimage(gzip.compress(tables)),
                      bzimage(lz4_legacy(tables)),
                      bzimage(zstd_kernel(tables)),
                      gzip.compress(tables),
                      tables):
            self.assertEqual(read_kallsyms(kernel_image(image)), symbols)

    def test_the_map_is_what_the_translator_reads(self) -> None:
        lines = list(system_map([Symbol(BASE, "T", "_text"), Symbol(BASE + 0x10, "t", "f")]))
        self.assertEqual(lines, ["ffffffff81000000 T _text\n", "ffffffff81000010 t f\n"])
        self.assertEqual(list(system_map([Symbol(0xC0000000, "T", "_text")])),
                         ["c0000000 T _text\n"])


class BadImageTests(TestCase):
    def test_an_image_without_tables(self) -> None:
        with self.assertRaisesRegex(KallsymsError, "no kallsyms token table"):
            read_kallsyms(random.Random(1).randbytes(1 << 16))

    def test_a_token_table_without_names(self) -> None:
        tables = build_tables(sample_symbols(1200))
        digits = tables.index(b"\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00")
        broken = tables[:4096] + bytes(digits - 200 - 4096) + tables[digits - 200:]
        with self.assertRaisesRegex(KallsymsError, "no kallsyms name table"):
            read_kallsyms(broken)

    def test_compressions_it_cannot_read(self) -> None:
        with self.assertRaisesRegex(KallsymsError, "does not decompress"):
            kernel_image(bzimage(b"\x28\xb5\x2f\xfd" + bytes(64)))
        with self.assertRaisesRegex(KallsymsError, "unknown"):
            kernel_image(bzimage(b"\x01\x02\x03\x04" + bytes(64)))
        with self.assertRaisesRegex(KallsymsError, "does not decompress"):
            kernel_image(bzimage(b"\xfd7zXZ\x00" + bytes(64)))

    def test_a_decompression_bomb_is_cut(self) -> None:
        self.patch(kallsyms, "MAX_IMAGE", 1 << 20)
        for bomb in (bzimage(lzma.compress(bytes(4 << 20), format=lzma.FORMAT_XZ)),
                     gzip.compress(bytes(4 << 20)), bzimage(lz4_legacy(bytes(9 << 20))),
                     bzimage(zstd_kernel(bytes(4 << 20)))):
            with self.assertRaisesRegex(KallsymsError, "larger than 1 MiB"):
                kernel_image(bomb)
        import zstandard
        unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4 << 20))
        with self.assertRaisesRegex(KallsymsError, "does not decompress"):
            kernel_image(bzimage(unsized))


class MainTests(TestCase):
    def test_writes_the_map_and_counts_the_functions(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        symbols = sample_symbols(1200)
        (directory / "vmlinuz").write_bytes(
            bzimage(lzma.compress(build_tables(symbols), format=lzma.FORMAT_XZ)))
        self.assertEqual(main([str(directory / "vmlinuz"), str(directory / "System.map")]), 0)
        lines = (directory / "System.map").read_text().splitlines()
        self.assertEqual(len(lines), len(symbols))
        self.assertIn("ffffffff81000000 T _text", lines)
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["System.map", "vmlinuz"])

    def test_a_bad_image_leaves_no_map(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "vmlinuz").write_bytes(bzimage(gzip.compress(bytes(1 << 16))))
        self.assertEqual(main([str(directory / "vmlinuz"), str(directory / "System.map")]), 1)
        self.assertEqual([p.name for p in directory.iterdir()], ["vmlinuz"])


class RelocatedBaseTests(TestCase):
    """arm64's relocatable Image: the relative base is 0 in the file and
    comes from its R_AARCH64_RELATIVE entry."""

    def test_the_entry_that_targets_the_word(self) -> None:
        from stapsrv.kernel.kallsyms import _relocated_base

        start, base_at = 0xFFFF800008000000, 0x1000
        decoy = struct.pack("<QQQ", start + 0x2000, 1027, start + 0x10)
        entry = struct.pack("<QQQ", start + base_at, 1027, start + 0x10000)
        image = bytearray(0x3000)
        image[0x2000:0x2000 + 48] = decoy + entry
        self.assertEqual(_relocated_base(bytes(image), base_at), start + 0x10000)
        self.assertEqual(_relocated_base(bytes(image[:0x2000 + 24]), base_at), 0)
