"""One request, parsed once: what the cache key, the translator command
line and the handler read.

``parse_job`` checks the archive and reads every member into memory (the
uncompressed size limit bounds them), exactly refusing what extraction
refuses; ``write_request`` then puts the members on disk for the
translator.  Blocking: run both in the thread pool.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from attrs import frozen

from stapsrv.compile.archive import (
    MEMBER_ERRORS,
    RequestRejected,
    check_request,
    checked_parts,
    make_dirs,
    write_file,
)
from stapsrv.core import members
from stapsrv.core.cmdline import Privilege, requested_privilege, scan_options
from stapsrv.core.members import LocaleResult
from stapsrv.core.scriptpaths import ScriptPaths, scan_script

#: Where the translator's working directory is, as far as relative paths in
#: arguments go: ``<TMPDIR>/<scratch>/request``.
_NOTIONAL_REQUEST = "/<tmpdir>/<scratch>/request"
#: Options whose effect reaches files no key can list (``--ldd`` reads every
#: shared library a probed program loads).
_UNFOLLOWABLE_OPTIONS = frozenset({"ldd"})

#: A member's path inside the request, split at ``/``.
Parts = tuple[str, ...]


def _server_path(word: str) -> str | None:
    """The server path ``word`` names when used by the translator, or None
    when it is not a path or stays inside the request."""
    if "/" not in word or "\0" in word:
        return None
    path = os.path.normpath(os.path.join(_NOTIONAL_REQUEST, word))
    if path == "/<tmpdir>/<scratch>" or path.startswith("/<tmpdir>/<scratch>/"):
        return None
    return path


def named_paths(arguments: Sequence[str], scripts: Iterable[bytes]) -> tuple[str, ...]:
    """Server paths that the arguments or script texts may make the
    translator read (see :func:`request_paths`)."""
    return request_paths(arguments, scripts).paths


def request_paths(arguments: Sequence[str], scripts: Iterable[bytes]) -> ScriptPaths:
    """Server paths that the arguments or script texts may make the
    translator read, and why they cannot all be fingerprinted (None when
    they can).  Generous on purpose: a word that merely looks like a path
    only adds a fingerprint to the key."""
    words: list[str] = []
    used: set[int] = set()
    texts = list(scripts)
    reason: str | None = None
    modules: set[str] = set()
    for option in scan_options(arguments):
        used.update(range(option.start, option.stop))
        if option.name in _UNFOLLOWABLE_OPTIONS and reason is None:
            reason = f"the option --{option.name}"
        if option.value is None:
            continue
        if option.name == "e":
            texts.append(os.fsencode(option.value))
        else:
            words.append(option.value)
            words.append(option.value.partition("=")[2])
    words += [word for index, word in enumerate(arguments) if index not in used]
    for text in texts:
        scanned = scan_script(text)
        words += scanned.paths
        modules.update(scanned.modules)
        reason = reason or scanned.uncacheable
    found = {path for word in words if (path := _server_path(word)) is not None}
    return ScriptPaths(tuple(sorted(found)), reason, tuple(sorted(modules)))


def _digest(files: Mapping[Parts, bytes], directories: Iterable[Parts]) -> bytes:
    """sha256 over every member's path and bytes, in name order."""
    digest = hashlib.sha256()
    for parts in sorted(set(directories) | set(files)):
        name = "/".join(parts).encode()
        if parts in files:
            data = files[parts]
            digest.update(b"f%d:%s%d:" % (len(name), name, len(data)) + data)
        else:
            digest.update(b"d%d:%s" % (len(name), name))
    return digest.digest()


@frozen
class Job:
    """A checked request archive and what its members say."""

    #: Every member in archive order: its path, and its bytes (None for a
    #: directory).
    entries: tuple[tuple[Parts, bytes | None], ...]
    digest: bytes
    client_version: str
    release: str | None
    #: ``argv1``..``argvN`` as the translator gets them.
    arguments: tuple[str, ...]
    privilege: Privilege
    locale: LocaleResult
    #: The ``mok_fingerprints`` member, when there is one.
    mok_fingerprints: bytes | None
    #: Server paths the request names (absolute, normalised); relative ones
    #: are given relative to the notional request directory.
    named_paths: tuple[str, ...] = ()
    #: Why the answer cannot be cached (a script names a server file in a
    #: form the key cannot fingerprint), or None.
    uncacheable: str | None = None
    #: A ``--privilege`` value stap does not know (it counts as stapdev).
    invalid_privilege: str | None = None
    #: Kernel modules the scripts name in ``module("name")`` probe points.
    named_modules: tuple[str, ...] = ()
    #: The architecture ``sysinfo`` names after the release (``x86_64``,
    #: ``arm64``), and the values of the arguments' ``-a``.
    architecture: str | None = None
    dash_a: tuple[str, ...] = ()

    @property
    def speaks_locale(self) -> bool:
        return members.speaks_locale(self.client_version)

    @property
    def wants_mok(self) -> bool:
        return bool((self.mok_fingerprints or b"").strip())


def needs_signature(job: Job) -> bool:
    """Whether the answer carries the server's ``.sgn`` signature."""
    return job.privilege in (Privilege.STAPUSR, Privilege.STAPSYS)


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    with archive.open(info) as source:
        data = source.read(budget + 1)
    if len(data) > budget:
        raise RequestRejected("Uncompressed request data exceeds the declared sizes")
    return data


def parse_job(body: bytes, max_size: int) -> Job:
    """Check and read a request archive.  Raises ``RequestRejected`` (with
    the line to log) when it is not a zip, is too big once uncompressed, or
    holds anything but plain files and directories at safe relative paths."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise RequestRejected(f"Unable to extract client request ({exc})") from exc
    entries: list[tuple[Parts, bytes | None]] = []
    files: dict[Parts, bytes] = {}
    with archive:
        budget = max_size
        for info in check_request(archive, max_size):
            parts = tuple(checked_parts(info.filename))
            if info.is_dir():
                entries.append((parts, None))
                continue
            try:
                data = _member_bytes(archive, info, budget)
            except MEMBER_ERRORS as exc:
                raise RequestRejected(f"Unable to extract client request ({exc})") from exc
            budget -= len(data)
            entries.append((parts, data))
            files[parts] = data
    arguments = tuple(os.fsdecode(argument)
                      for argument in members.arguments(lambda name: files.get((name,))))
    privilege = requested_privilege(arguments)
    scripts = [data for parts, data in files.items() if parts[0] in ("script", "tapset")]
    paths = request_paths(arguments, scripts)
    return Job(
        entries=tuple(entries),
        digest=_digest(files, (parts for parts, data in entries if data is None)),
        client_version=members.client_version(files.get(("version",))),
        release=members.target_release(files.get(("sysinfo",))),
        arguments=arguments,
        privilege=privilege.privilege,
        locale=members.filter_locale(files.get(("locale",)) or b""),
        mok_fingerprints=files.get(("mok_fingerprints",)),
        named_paths=paths.paths,
        uncacheable=paths.uncacheable,
        invalid_privilege=privilege.invalid_value,
        named_modules=paths.modules,
        architecture=members.target_architecture(files.get(("sysinfo",))),
        dash_a=tuple(option.value or "" for option in scan_options(arguments)
                     if option.name == "a"),
    )


def write_request(job: Job, destination: Path) -> None:
    """Put the members under ``destination`` (which exists), never outside
    it.  Raises ``RequestRejected`` when a member cannot be written."""
    for parts, data in job.entries:
        try:
            if data is None:
                make_dirs(destination, parts)
                continue
            make_dirs(destination, parts[:-1])
            write_file(destination.joinpath(*parts), data)
        except RequestRejected:
            raise
        except OSError as exc:
            raise RequestRejected(f"Unable to extract client request ({exc})") from exc


def extract_request(body: bytes, destination: Path, max_size: int) -> None:
    """Check and unpack a request archive into ``destination`` (which exists);
    ``RequestRejected`` as :func:`parse_job` and :func:`write_request` raise it."""
    write_request(parse_job(body, max_size), destination)
