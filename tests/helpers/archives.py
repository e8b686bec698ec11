"""Request archives built for tests."""

from __future__ import annotations

import io
import zipfile


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


#: Plain data for the fake translator, which needs no headers.  Tests that
#: build for real take tests.helpers.header_release() instead.
RELEASE = "6.1.0-56-amd64"


def request(*arguments: str, release: str = RELEASE, locale: bytes = b"LANG=C.UTF-8\n",
            version: bytes = b"4.8") -> bytes:
    entries = [(f"argv{i}", a.encode(), 0o100644) for i, a in enumerate(arguments, 1)]
    entries += [("sysinfo", f"sysinfo: {release} x86_64".encode(), 0o100644),
                ("locale", locale, 0o100644), ("version", version, 0o100644)]
    return make_zip(entries)
