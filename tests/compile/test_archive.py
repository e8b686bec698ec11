from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from random import Random

import attrs
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from stapsrv.compile.archive import (
    RequestRejected,
    build_response,
    check_request,
    read_arguments,
)
from stapsrv.compile.job import extract_request
from tests.helpers.archives import make_zip
from tests.helpers.strategies import fixed
from tests.helpers.vectors import captured_requests, members



def tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        found[name + "/" if path.is_dir() else name] = None if path.is_dir() else path.read_bytes()
    return found


class ExtractTests(TestCase):
    def setUp(self) -> None:
        self.scratch = Path(self.mktemp())
        self.scratch.mkdir()
        self.target = self.scratch / "request"
        self.target.mkdir()

    def test_every_captured_request_unpacks_exactly(self) -> None:
        for name, body in captured_requests().items():
            target = self.scratch / name
            target.mkdir()
            extract_request(body, target, 50000)
            files = {k: v for k, v in tree(target).items() if v is not None}
            expected = {k: v for k, v in members(body).items() if not k.endswith("/")}
            self.assertEqual(files, expected, name)

    def test_regular_file_modes(self) -> None:
        extract_request(make_zip([("argv1", b"-p2", 0o100777)]), self.target, 100)
        self.assertEqual(stat.S_IMODE((self.target / "argv1").stat().st_mode), 0o644)

    def assertRejected(self, body: bytes, fragment: str, limit: int = 50000) -> None:
        with self.assertRaises(RequestRejected) as caught:
            extract_request(body, self.target, limit)
        self.assertIn(fragment, str(caught.exception))
        outside = [p for p in self.scratch.rglob("*") if not str(p).startswith(str(self.target))]
        self.assertEqual(outside, [], "nothing may be written outside the request")

    def test_not_a_zip(self) -> None:
        self.assertRejected(b"this is not a zip file", "Unable to extract client request")

    def test_truncated_zip(self) -> None:
        body = make_zip([("argv1", b"x" * 100, 0o100644)])
        self.assertRejected(body[: len(body) // 2], "Unable to extract client request")

    def test_uncompressed_size_over_limit_uses_48_wording(self) -> None:
        self.assertRejected(
            make_zip([("argv1", b"x" * 11, 0o100644)]),
            "Uncompressed request size of 11 bytes is not within the expected range of 1 to 10 bytes.",
            limit=10)
        self.assertEqual(list(self.target.iterdir()), [])

    def test_empty_request(self) -> None:
        self.assertRejected(make_zip([("argv1", b"", 0o100644)]),
                            "Uncompressed request size of 0 bytes")

    def test_zip_bomb(self) -> None:
        body = make_zip([("argv1", b"\0" * 10_000_000, 0o100644)])
        self.assertLess(len(body), 20000)
        self.assertRejected(body, "Uncompressed request size of 10000000 bytes")

    def test_parent_directory(self) -> None:
        self.assertRejected(make_zip([("script/../../evil", b"x", 0o100644)]), "Unsafe member")

    def test_absolute_path(self) -> None:
        self.assertRejected(make_zip([("/tmp/evil", b"x", 0o100644)]), "Absolute member")

    def test_symlink(self) -> None:
        self.assertRejected(make_zip([("script/link", b"/etc/passwd", 0o120777)]),
                            "not a regular file")

    def test_device_and_fifo(self) -> None:
        for mode in (stat.S_IFCHR | 0o644, stat.S_IFBLK | 0o644, stat.S_IFIFO | 0o644):
            self.assertRejected(make_zip([("argv1", b"x", mode)]), "not a regular file")

    def test_name_with_newline_or_nul(self) -> None:
        self.assertRejected(make_zip([("argv1\nx", b"x", 0o100644)]), "Unsafe member")
        # zipfile cannot write a NUL in a name: patch the bytes afterwards.
        body = make_zip([("argv1Qx", b"x", 0o100644)]).replace(b"argv1Qx", b"argv1\0x")
        self.assertRejected(body, "Unsafe member")

    def test_duplicate_member(self) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("argv1", b"a")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                archive.writestr("argv1", b"b")
        self.assertRejected(buffer.getvalue(), "appears twice")

    def test_too_many_members(self) -> None:
        self.assertRejected(make_zip([(f"f{i}", b"", 0o100644) for i in range(10000)] +
                                     [("argv1", b"x", 0o100644)]), "Too many members")

    def test_file_where_a_directory_is_needed(self) -> None:
        self.assertRejected(make_zip([("script", b"x", 0o100644),
                                      ("script/a.stp", b"y", 0o100644)]),
                            "'script' is not a request member")
        self.assertRejected(make_zip([("tapset/a", b"x", 0o100644),
                                      ("tapset/a/b.stp", b"y", 0o100644)]), "not a directory")

    def test_only_protocol_members_are_accepted(self) -> None:
        accepted = make_zip([(name, b"x", 0o100644) for name in (
            "argv1", "argv12", "sysinfo", "version", "locale", "mok_fingerprints",
            "script/home/u/a.stp", "tapset/home/u/t/x.stp")] + [("script/", b"", 0o40755)])
        extract_request(accepted, self.target, 1000)
        for name in ("rc", "argv0", "argv01", "argv", "argvX", ".hidden", "stap000000/x.ko",
                     "sysinfo/x", "locale/", "a", "include/netinet/in.h"):
            with self.assertRaises(RequestRejected) as caught:
                check_request(zipfile.ZipFile(io.BytesIO(make_zip([
                    ("argv1", b"-p4", 0o100644),
                    (name, b"" if name.endswith("/") else b"x",
                     0o40755 if name.endswith("/") else 0o100644)]))), 1000)
            message = caught.exception.client_message or ""
            self.assertIn("which is not one of the request members this server accepts",
                          message, name)

    def test_dot_components_are_harmless(self) -> None:
        extract_request(make_zip([("./script/./a.stp", b"y", 0o100644)]), self.target, 100)
        self.assertEqual((self.target / "script" / "a.stp").read_bytes(), b"y")


class BuildResponseTests(TestCase):
    def test_layout_like_zip_r(self) -> None:
        root = Path(self.mktemp())
        (root / "stap000000" / "uprobes").mkdir(parents=True)
        (root / "version").write_text("4.8")
        (root / "rc").write_text("0")
        (root / "stap000000" / "stap_x.ko").write_bytes(b"\x7fELF")
        real = root.parent.absolute() / "elsewhere.txt"
        real.write_text("linked")
        os.symlink(real, root / "stap000000" / "link.txt")
        found = members(build_response(root))
        self.assertEqual(sorted(found), [
            "rc", "stap000000/", "stap000000/link.txt", "stap000000/stap_x.ko",
            "stap000000/uprobes/", "version"])
        self.assertEqual(found["stap000000/link.txt"], b"linked")
        self.assertEqual(found["version"], b"4.8")


@attrs.frozen
class Member:
    """One archive member as a hostile client might write it."""

    name: str            # may hold NUL, "..", a leading "/", a trailing "/"
    data: bytes = b""
    mode: int = stat.S_IFREG | 0o644
    declared: int | None = None     # a lying uncompressed size
    method: int | None = None       # a lying compression method
    encrypted: bool = False
    deflate: bool = True


_NUL_STAND_IN = "\x01"  # zipfile cuts names at NUL: write this, patch it afterwards


def _patch_names(body: bytearray, infos: list[zipfile.ZipInfo]) -> None:
    """Turn the stand-in character back into NUL in local and central names."""
    for info in infos:
        start = info.header_offset + 30
        length = int.from_bytes(body[start - 4:start - 2], "little")
        body[start:start + length] = body[start:start + length].replace(b"\x01", b"\0")
    end = body.rfind(b"PK\x05\x06")
    position = int.from_bytes(body[end + 16:end + 20], "little")
    while body[position:position + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = (
            int.from_bytes(body[position + at:position + at + 2], "little")
            for at in (28, 30, 32))
        start = position + 46
        body[start:start + name_length] = body[start:start + name_length].replace(
            b"\x01", b"\0")
        position = start + name_length + extra_length + comment_length


def build_archive(members: list[Member]) -> bytes:
    """Zip ``members``; sizes, methods and flags may lie in the central directory."""
    buffer = io.BytesIO()
    infos = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(buffer, "w") as archive:
            for member in members:
                info = zipfile.ZipInfo(member.name.replace("\0", _NUL_STAND_IN))
                info.external_attr = member.mode << 16
                if member.name.endswith("/"):
                    info.external_attr |= 0x10
                info.compress_type = zipfile.ZIP_DEFLATED if member.deflate else zipfile.ZIP_STORED
                archive.writestr(info, member.data)
                if member.declared is not None:
                    info.file_size = member.declared
                if member.method is not None:
                    info.compress_type = member.method
                if member.encrypted:
                    info.flag_bits |= 0x1
                infos.append(info)
    body = bytearray(buffer.getvalue())
    _patch_names(body, infos)
    return bytes(body)


_SAFE_PARTS = ("a", "b", "argv1", "argv2", "script", "tapset", "version", "x y", "é", "...",
               "link", "flink")
_HOSTILE_PARTS = ("..", ".", "", "\0", "a\0b", "a\nb", "a\rb", "a\\..", "n" * 300)
_MODES = (0, stat.S_IFREG | 0o644, stat.S_IFREG | 0o6777, stat.S_IFDIR | 0o755,
          stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o600,
          stat.S_IFBLK | 0o600, stat.S_IFSOCK | 0o644)
#: The start of what zipfile's LZMA reader expects, to meet a lying method 14.
_LZMA_HEADER = b"\x09\x14\x05\x00"
_data = st.one_of(st.binary(max_size=48), st.integers(0, 3000).map(lambda n: b"z" * n),
                  st.just(b"/etc/passwd"), st.just(b"../../outside"),
                  st.binary(max_size=24).map(lambda b: _LZMA_HEADER + b))


@st.composite
def _name(draw: st.DrawFn, parts: st.SearchStrategy[str]) -> str:
    name = "/".join(draw(st.lists(parts, min_size=1, max_size=4)))
    if draw(st.integers(0, 9)) == 0:
        name = "/" + name
    if draw(st.integers(0, 5)) == 0:
        name += "/"
    return name or "a"


_safe_member = st.builds(
    Member,
    name=_name(st.sampled_from(_SAFE_PARTS)),
    data=_data,
    mode=st.sampled_from([0, stat.S_IFREG | 0o644, stat.S_IFREG | 0o4755]),
    deflate=st.booleans(),
)
_hostile_member = st.builds(
    Member,
    name=_name(st.sampled_from(_SAFE_PARTS + _HOSTILE_PARTS)),
    data=_data,
    mode=st.one_of(st.sampled_from(_MODES), st.integers(0, 0xFFFF)),
    declared=st.one_of(st.none(), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40]),
                       st.integers(0, 3000)),
    method=st.one_of(st.none(), st.sampled_from([0, 8, 12, 14, 99])),
    encrypted=st.integers(0, 9).map(lambda n: n == 0),
    deflate=st.booleans(),
)


def _parts(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split("/") if part not in ("", "."))


def _unsafe(member: Member) -> bool:
    """What a reviewer requires to be refused in any case."""
    name = member.name
    kind = stat.S_IFMT(member.mode)
    allowed = (0, stat.S_IFDIR) if name.endswith("/") else (0, stat.S_IFREG)
    return (any(char in name for char in "\0\n\r\\") or name.startswith("/")
            or ".." in name.split("/") or not _parts(name) or kind not in allowed
            or member.encrypted)


def _undefined(member: Member) -> bool:
    """Not a member the protocol defines (spec §4.2)."""
    parts = _parts(member.name)
    is_dir = member.name.endswith("/")
    if not parts:
        return False
    if parts[0] in ("script", "tapset"):
        return len(parts) == 1 and not is_dir
    return (len(parts) > 1 or is_dir or not (
        parts[0] in ("version", "sysinfo", "locale", "mok_fingerprints")
        or re.fullmatch(r"argv[1-9][0-9]*", parts[0])))


def must_reject(members: list[Member], max_size: int, planted: bool) -> bool:
    declared = sum(len(m.data) if m.declared is None else m.declared for m in members)
    if (not 1 <= declared <= max_size or any(_unsafe(m) for m in members)
            or any(_undefined(m) for m in members)):
        return True
    files = [_parts(m.name) for m in members if not m.name.endswith("/")]
    directories = {_parts(m.name) for m in members if m.name.endswith("/")}
    everything = directories | set(files)
    if len(set(files)) != len(files) or directories & set(files):
        return True
    for file in files:  # a file where a directory is needed
        if any(len(other) > len(file) and other[:len(file)] == file for other in everything):
            return True
    return planted and any(p[0] in ("link", "flink") for p in everything)


def _irregular(member: Member) -> bool:
    """Lies and oddities that may or may not make extraction fail."""
    return (member.declared is not None or member.method is not None
            or any(len(part) > 255 for part in member.name.split("/")))


def _snapshot(root: Path, skip: Path) -> dict[str, object]:
    """Everything under ``root`` except ``skip``, without following links."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[key] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
            else:
                found[key] = ("dir", stat.S_IMODE(info.st_mode))
    return found


class ExtractPropertyTests(TestCase):
    """Hostile archives: refused, or unpacked only inside the request directory."""

    def setUp(self) -> None:
        self.scratch = Path(self.mktemp())
        self.scratch.mkdir()

    def attempt(self, body: bytes, max_size: int, planted: bool = False
                ) -> tuple[Path, RequestRejected | None]:
        """Extract into a fresh ``base/mid/dest`` next to an ``outside`` tree;
        check confinement; return the destination and any refusal."""
        base = Path(tempfile.mkdtemp(dir=self.scratch)).absolute()
        self.addCleanup(shutil.rmtree, base)
        (base / "outside").mkdir()
        (base / "outside" / "victim").write_bytes(b"original")
        destination = base / "mid" / "dest"
        destination.mkdir(parents=True)
        if planted:  # defence in depth: links the server itself never makes
            os.symlink(base / "outside", destination / "link")
            os.symlink(base / "outside" / "victim", destination / "flink")
        before = _snapshot(base, destination)
        refusal = None
        try:
            extract_request(body, destination, max_size)
        except RequestRejected as exc:
            refusal = exc
            self.assertTrue(str(exc))
        self.assertEqual(_snapshot(base, destination), before,
                         "nothing outside the request directory may change")
        total = 0
        for dirpath, dirnames, filenames in os.walk(destination):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                info = path.lstat()
                if planted and path.parent == destination and name in ("link", "flink"):
                    self.assertTrue(stat.S_ISLNK(info.st_mode))
                    continue
                self.assertFalse(stat.S_ISLNK(info.st_mode), f"symlink {path} created")
                if stat.S_ISDIR(info.st_mode):
                    self.assertEqual(stat.S_IMODE(info.st_mode) & ~0o755, 0, path)
                else:
                    self.assertTrue(stat.S_ISREG(info.st_mode), path)
                    self.assertEqual(stat.S_IMODE(info.st_mode) & ~0o644, 0, path)
                    total += info.st_size
        self.assertLessEqual(total, max_size, "more data written than the limit allows")
        return destination, refusal

    @fixed(250)
    @given(members=st.lists(st.one_of(_safe_member, _safe_member, _hostile_member),
                            min_size=1, max_size=7),
           max_size=st.integers(1, 3000), planted=st.booleans())
    @example(members=[Member("argv1", b"\xff" * 8, deflate=False, method=8)],
             max_size=3000, planted=False)
    @example(members=[Member("argv1", _LZMA_HEADER + b"\xff" * 12, deflate=False, method=14)],
             max_size=3000, planted=False)
    def test_hostile_archives(self, members: list[Member], max_size: int,
                              planted: bool) -> None:
        """Unsafe names, links, devices, duplicates, lying sizes and methods,
        zip bombs: every archive is refused with RequestRejected or unpacked
        exactly, inside the destination, within the size limit; what a
        reviewer requires refused is refused, and a plain archive is not."""
        body = build_archive(members)
        destination, refusal = self.attempt(body, max_size, planted)
        if must_reject(members, max_size, planted):
            self.assertIsNotNone(refusal, "an unsafe archive was accepted")
        elif not any(_irregular(m) for m in members):
            self.assertIsNone(refusal, "a plain archive was refused")
        if refusal is None:
            expected: dict[str, bytes | None] = {}
            for member in members:
                parts = _parts(member.name)
                for depth in range(1, len(parts)):
                    expected["/".join(parts[:depth]) + "/"] = None
                if member.name.endswith("/"):
                    expected["/".join(parts) + "/"] = None
                else:
                    expected["/".join(parts)] = member.data
            found = {}
            skip = destination / "link" if planted else destination
            for key, value in _snapshot(destination, skip).items():
                if planted and key == "flink":
                    continue
                found[key + "/" if value[0] == "dir" else key] = (
                    value[1] if value[0] == "file" else None)
            self.assertEqual(found, expected)

    _SCRIPT = b"".join(b"probe kernel.function(\"vfs_%d\") { n[%d] <<< $count }\n" % (i, i * 7)
                       for i in range(12))
    _BASE = make_zip([("version", b"4.8", 0o100644), ("argv1", b"script/a.stp", 0o100644),
                      ("script/", b"", 0o40755), ("script/a.stp", _SCRIPT, 0o100644)])
    #: Where the compressed bytes of script/a.stp start.
    _DATA_AT = zipfile.ZipFile(io.BytesIO(_BASE)).getinfo("script/a.stp").header_offset + 42

    @fixed(200)
    @given(edits=st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)),
                          min_size=1, max_size=8),
           cut=st.integers(0, len(_BASE)), planted=st.booleans())
    @example(edits=[(_DATA_AT, 0)], cut=len(_BASE), planted=False)
    def test_corrupted_archives(self, edits: list[tuple[int, int]], cut: int,
                                planted: bool) -> None:
        """A valid request with bytes overwritten and its tail cut off is refused
        with RequestRejected or unpacked, never anything else (corrupt
        compressed data included)."""
        body = bytearray(self._BASE)
        for position, value in edits:
            body[position] = value
        self.attempt(bytes(body[:cut]), 50000, planted)

    @fixed(100)
    @given(body=st.one_of(st.binary(max_size=300),
                          st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b),
                          st.binary(max_size=300).map(lambda b: b + b"PK\x05\x06" + bytes(18))))
    def test_random_bytes(self, body: bytes) -> None:
        """Arbitrary bytes are refused with RequestRejected and write nothing."""
        destination, refusal = self.attempt(body, 50000)
        self.assertIsNotNone(refusal)
        self.assertEqual(list(destination.iterdir()), [])

    @fixed(100)
    @given(arguments=st.lists(st.binary(max_size=24), min_size=1, max_size=8),
           stop=st.integers(0, 8), gap_is_directory=st.booleans(), order=st.randoms())
    def test_arguments_round_trip(self, arguments: list[bytes], stop: int,
                                  gap_is_directory: bool, order: Random) -> None:
        """``argv1``..``argvN`` sent in any order come back from the unpacked
        request in number order, byte for byte, each cut at its first NUL,
        up to the first missing (or non-file) number."""
        stop = min(stop, len(arguments))
        entries = [("version", b"4.8", 0o100644)]
        entries += [(f"argv{i}", a, 0o100644) for i, a in enumerate(arguments, 1) if i != stop]
        if stop and gap_is_directory:
            entries.append((f"argv{stop}/", b"", 0o40755))
        order.shuffle(entries)
        destination, refusal = self.attempt(make_zip(entries), 50000)
        if stop and gap_is_directory:
            self.assertIsNotNone(refusal, "an argv directory is not a request member")
            return
        self.assertIsNone(refusal)
        expected = arguments[:stop - 1] if stop else arguments
        self.assertEqual(read_arguments(destination), [a.split(b"\0", 1)[0] for a in expected])
