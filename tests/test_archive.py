from __future__ import annotations

import io
import os
import stat
import warnings
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.archive import RequestRejected, build_response, extract_request
from tests.vectors import captured_requests, members


def make_zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    """Build an archive from (name, data, unix mode) triples."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


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
                                      ("script/a.stp", b"y", 0o100644)]), "not a directory")

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
