"""The fleet secret and the Redis password: files only the server user reads.

``create_secret`` makes a secret file (32 random bytes, mode 0600, created
atomically: a reader never sees it half written, and an existing file is
kept unless replacing it was asked for).  ``load_secret`` and
``load_password`` read them back for a server, refusing files that others
may read or write.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: Bytes of a new secret; a shorter file is refused.
SECRET_BYTES = 32
#: Larger files are refused (a secret or a password is never this long).
MAX_FILE_BYTES = 4096
#: The environment variable that may hold the Redis password.
PASSWORD_VARIABLE = "STAPSRV_FLEET_PASSWORD"
#: The command that makes a secret file, for messages.
SECRET_COMMAND = "python3 -m stapsrv.cli.fleet secret FILE"


class SecretError(Exception):
    """A secret or password file that cannot be used; the message says why."""


def create_secret(path: Path, force: bool = False,
                  owner: tuple[int, int] | None = None) -> None:
    """Write a new secret to ``path`` (owned by ``owner``'s uid and gid when
    given).  Raises ``SecretError``."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise SecretError(f"cannot create a file in {directory}: {exc.strerror}") from None
    try:
        try:
            with os.fdopen(fd, "wb") as out:  # mkstemp made it 0600
                out.write(os.urandom(SECRET_BYTES))
                if owner is not None:
                    os.fchown(out.fileno(), *owner)
                out.flush()
                os.fsync(out.fileno())
            if force:
                os.replace(temporary, path)
            else:
                os.link(temporary, path)  # fails, atomically, if path exists
        except FileExistsError:
            raise SecretError(f"{path} exists; give --force to replace it "
                              f"(every server of the fleet then needs the new one)") from None
        except OSError as exc:
            raise SecretError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def _read_private(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretError(f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretError(f"the {what} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretError(f"the {what} {path} is open to other users (mode {mode:04o}); "
                              f"make it mode 0600 (chmod 600 {path})")
        data = b""
        while len(data) <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise SecretError(f"cannot read the {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise SecretError(f"the {what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def load_secret(path: Path) -> bytes:
    """The fleet secret in ``path``.  Raises ``SecretError``."""
    secret = _read_private(path, "fleet secret")
    if len(secret) < SECRET_BYTES:
        raise SecretError(f"the fleet secret {path} has {len(secret)} bytes, fewer than "
                          f"{SECRET_BYTES}; make one with {SECRET_COMMAND}")
    return secret


def load_password(path: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The Redis password: the first line of ``path``, else
    ``$STAPSRV_FLEET_PASSWORD``, else None.  Raises ``SecretError``."""
    if path is None:
        return environ.get(PASSWORD_VARIABLE) or None
    data = _read_private(path, "Redis password file")
    lines = data.decode("utf-8", errors="surrogateescape").splitlines()
    if not lines or not lines[0]:
        raise SecretError(f"the Redis password file {path} is empty")
    return lines[0]
