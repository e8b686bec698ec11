"""Request archive checks, the request directory on disk, and response
archives.

Blocking file work: callers run these functions in the server's thread
pool.  Nothing here ever writes outside the directory it is given.  The
request is read once, by :mod:`stapsrv.compile.job`, with these checks.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from stapsrv.core import members
from stapsrv.core.members import LocaleResult

#: The most members a request may hold.  A real client sends its argv files,
#: four fixed files and the script and tapset trees; the uncompressed size
#: limit keeps those small, but empty members cost nothing to declare.
MAX_MEMBERS = 4096

#: The members the protocol defines (spec §4.2): these files at the top...
_FILES = frozenset({"version", "sysinfo", "locale", "mok_fingerprints"})
_ARGUMENT = re.compile(r"argv[1-9][0-9]*")
#: ...and these trees.
_TREES = frozenset({"script", "tapset"})

#: What reading a damaged or hostile member may raise.
MEMBER_ERRORS = (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError,
                 zlib.error, lzma.LZMAError)


class RequestRejected(Exception):
    """The request archive cannot be used.  ``str(exc)`` is the log line;
    ``client_message``, when set, is worth an answer to the client (the
    other cases are not what a real client sends, and get a plain close)."""

    def __init__(self, log_message: str, client_message: str | None = None) -> None:
        super().__init__(log_message)
        self.client_message = client_message


def _member_mode(info: zipfile.ZipInfo) -> int:
    return info.external_attr >> 16


def checked_parts(name: str) -> list[str]:
    """Split an archive member name, refusing anything that could escape."""
    if not name or "\0" in name or "\n" in name or "\r" in name or "\\" in name:
        raise RequestRejected(f"Unsafe member name {name!r} in client request")
    if name.startswith("/"):
        raise RequestRejected(f"Absolute member name {name!r} in client request")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise RequestRejected(f"Unsafe member name {name!r} in client request")
    return parts


def _check_defined(name: str, parts: tuple[str, ...], is_dir: bool) -> None:
    """Refuse a member the protocol does not define: nothing but the client's
    own files may reach the translator's working directory."""
    top = parts[0]
    if top in _TREES and (len(parts) > 1 or is_dir):
        return
    if len(parts) == 1 and not is_dir and (top in _FILES or _ARGUMENT.fullmatch(top)):
        return
    shown = name if name.isprintable() and len(name) <= 200 else repr(name[:200])
    raise RequestRejected(
        f"Member {name[:200]!r} is not a request member",
        f"Server: The request holds '{shown}', which is not one of the request members "
        "this server accepts (argvN, sysinfo, version, locale, mok_fingerprints, "
        "script/..., tapset/...).")


def check_request(archive: zipfile.ZipFile, max_size: int) -> list[zipfile.ZipInfo]:
    """Validate every member before anything is written; return the members."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise RequestRejected(
            f"Too many members ({len(members)}) in client request; the limit is {MAX_MEMBERS}"
        )
    total = sum(info.file_size for info in members)
    if not 1 <= total <= max_size:
        raise RequestRejected(
            f"Uncompressed request size of {total} bytes is not within the "
            f"expected range of 1 to {max_size} bytes.",
            f"Server: The request is {total} bytes uncompressed; this server accepts "
            f"1 to {max_size} bytes (its --max-request-size)."
        )
    seen: set[tuple[str, ...]] = set()
    for info in members:
        # zipfile cuts names at a NUL byte; the original name tells.
        checked_parts(info.orig_filename)
        parts = tuple(checked_parts(info.filename))
        mode = _member_mode(info)
        kind = stat.S_IFMT(mode)
        if info.is_dir():
            if kind not in (0, stat.S_IFDIR):
                raise RequestRejected(f"Member {info.filename!r} is not a plain directory")
        elif kind not in (0, stat.S_IFREG):
            raise RequestRejected(f"Member {info.filename!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise RequestRejected(f"Member {info.filename!r} is encrypted")
        if parts in seen and not info.is_dir():
            raise RequestRejected(f"Member {info.filename!r} appears twice")
        seen.add(parts)
    for info in members:
        _check_defined(info.filename, tuple(checked_parts(info.filename)), info.is_dir())
    return members


def make_dirs(root: Path, parts: Sequence[str]) -> None:
    """``root/parts...`` as real directories (0755), each made or found."""
    current = root
    for part in parts:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise RequestRejected(f"Request path {current.name!r} is not a directory") from None


def write_file(target: Path, data: bytes) -> None:
    """A new file (0644) that no link can redirect."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


# --- an unpacked request directory, as the translator sees it -----------------


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def read_client_version(request_dir: Path) -> str:
    return members.client_version(_read(request_dir / "version"))


def read_target_release(request_dir: Path) -> str | None:
    return members.target_release(_read(request_dir / "sysinfo"))


def read_arguments(request_dir: Path) -> list[bytes]:
    return members.arguments(lambda name: _read(request_dir / name))


def read_locale(request_dir: Path) -> LocaleResult:
    return members.filter_locale(_read(request_dir / "locale") or b"")


def build_response(response_dir: Path,
                   include: Callable[[str], bool] | None = None) -> bytes:
    """Zip a response directory the way ``zip -r`` from inside it would.

    Names are relative (no ``./``), directories get their own entries and
    symbolic links are followed, so the client sees plain files.  With
    ``include``, only members whose archive name it accepts are stored.
    The archive is made in an unnamed file beside the directory (members
    are copied into it in blocks) and read once: the answer is in memory
    once, and no member is ever held whole.
    """
    with tempfile.TemporaryFile(dir=response_dir.parent) as spool:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            for dirpath, dirnames, filenames in os.walk(response_dir, followlinks=True):
                dirnames.sort()
                base = Path(dirpath)
                relative = base.relative_to(response_dir)
                if relative != Path("."):
                    directory = relative.as_posix() + "/"
                    if include is None or include(directory):
                        archive.write(base, directory)
                for name in sorted(filenames):
                    path = base / name
                    member = (relative / name).as_posix()
                    if not path.is_file() or (include is not None and not include(member)):
                        continue
                    archive.write(path, member)
        spool.seek(0)
        return spool.read()


def refusal_archive(message: str, version: str) -> bytes:
    """A response that makes the client print ``message`` and fail (rc 1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in (("rc", "1"), ("stderr", message + "\n"), ("stdout", ""),
                           ("version", version)):
            archive.writestr(name, text)
        archive.writestr("stap000000/", b"")
    return buffer.getvalue()
