"""Request archive checks and extraction; response archive building.

Blocking file work: callers run these functions in the server's thread
pool.  Nothing here ever writes outside the directory it is given.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

#: The most members a request may hold.  A real client sends its argv files,
#: four fixed files and the script and tapset trees; the uncompressed size
#: limit keeps those small, but empty members cost nothing to declare.
MAX_MEMBERS = 4096

_CHUNK = 64 * 1024

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


def _checked_parts(name: str) -> list[str]:
    """Split an archive member name, refusing anything that could escape."""
    if not name or "\0" in name or "\n" in name or "\r" in name or "\\" in name:
        raise RequestRejected(f"Unsafe member name {name!r} in client request")
    if name.startswith("/"):
        raise RequestRejected(f"Absolute member name {name!r} in client request")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise RequestRejected(f"Unsafe member name {name!r} in client request")
    return parts


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
        _checked_parts(info.orig_filename)
        parts = tuple(_checked_parts(info.filename))
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
    return members


def extract_request(body: bytes, destination: Path, max_size: int) -> None:
    """Check and unpack a request archive into ``destination`` (which exists).

    Raises ``RequestRejected`` with the line to log when the archive is not
    a zip, is too big once uncompressed, or holds anything but plain files
    and directories at safe relative paths.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise RequestRejected(f"Unable to extract client request ({exc})") from exc
    with archive:
        members = check_request(archive, max_size)
        budget = max_size
        for info in members:
            parts = _checked_parts(info.filename)
            target = destination.joinpath(*parts)
            try:
                if info.is_dir():
                    _make_dirs(destination, parts)
                    continue
                _make_dirs(destination, parts[:-1])
                budget = _write_member(archive, info, target, budget)
            except RequestRejected:
                raise
            except MEMBER_ERRORS as exc:
                raise RequestRejected(f"Unable to extract client request ({exc})") from exc


def _make_dirs(root: Path, parts: list[str]) -> None:
    current = root
    for part in parts:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise RequestRejected(f"Request path {current.name!r} is not a directory") from None


def _write_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int
) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out, archive.open(info) as source:
        while True:
            chunk = source.read(min(_CHUNK, budget + 1))
            if not chunk:
                break
            budget -= len(chunk)
            if budget < 0:
                raise RequestRejected(
                    "Uncompressed request data exceeds the declared sizes"
                )
            out.write(chunk)
    return budget


def build_response(response_dir: Path,
                   include: Callable[[str], bool] | None = None) -> bytes:
    """Zip a response directory the way ``zip -r`` from inside it would.

    Names are relative (no ``./``), directories get their own entries and
    symbolic links are followed, so the client sees plain files.  With
    ``include``, only members whose archive name it accepts are stored.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
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
    return buffer.getvalue()


def refusal_archive(message: str, version: str) -> bytes:
    """A response that makes the client print ``message`` and fail (rc 1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in (("rc", "1"), ("stderr", message + "\n"), ("stdout", ""),
                           ("version", version)):
            archive.writestr(name, text)
        archive.writestr("stap000000/", b"")
    return buffer.getvalue()
