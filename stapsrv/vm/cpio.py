"""The "newc" cpio format the kernel unpacks an initramfs from.  Sans-IO:
entries in, bytes out; every owner and mode is the caller's to choose, so
a setuid-root ``staprun`` needs no root to pack."""

from __future__ import annotations

import stat
from collections.abc import Iterable

from attrs import frozen

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@frozen
class Entry:
    """One member: ``mode`` includes the file type bits; ``data`` is a
    regular file's contents or a symbolic link's target."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | mode)


def regular(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, stat.S_IFREG | mode, data, uid, gid)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | mode, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(number: int, entry: Entry) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (number, entry.mode, entry.uid, entry.gid, nlink, 0, len(entry.data),
              0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad(len(header) + len(name)) + entry.data + _pad(len(entry.data))


def archive(entries: Iterable[Entry]) -> bytes:
    """The archive of ``entries`` in their order (parents before children),
    ending with the trailer."""
    parts = [_member(number, entry) for number, entry in enumerate(entries, start=1)]
    parts.append(_member(0, Entry(_TRAILER, 0)))
    return b"".join(parts)
