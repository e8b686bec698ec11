"""NSS trust databases of the stap client (spec §2.4; where they live:
:mod:`stapsrv.paths`).

The real client trusts a server when its exact certificate sits in an NSS
sql database under the nickname ``stap-server`` with trust ``P,P,P``.  A
4.8 server puts its own certificate into the client database of the user it
runs as on every start; :func:`trust_certificate` does the same with
``certutil`` (libnss3-tools).  It blocks: run it in a thread.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.logger import Logger

log = Logger(namespace="stapsrv")

NICKNAME = "stap-server"
TRUST_FLAGS = "P,P,P"
CLIENT_DB_DIR_MODE = 0o755
CLIENT_DB_FILE_MODE = 0o644
#: The file whose presence means "this directory holds an NSS sql database".
SQL_CERT_DB = "cert9.db"
CERTUTIL_TIMEOUT = 60.0


class CertutilError(RuntimeError):
    """certutil failed, could not be run, or timed out."""


def _database(db_dir: Path) -> str:
    return f"sql:{db_dir}"


def _run_certutil(certutil: str, arguments: Sequence[str],
                  ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
    """Run certutil, raising :class:`CertutilError` with its stderr on failure."""
    command = [certutil, *arguments]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=CERTUTIL_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise CertutilError(f"{certutil} not found (install libnss3-tools): {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CertutilError(f"{' '.join(command)} timed out after {exc.timeout} s") from exc
    if result.returncode not in ok_codes:
        stderr = result.stderr.decode(errors="replace").strip()
        raise CertutilError(
            f"{' '.join(command)} failed with exit status {result.returncode}: {stderr}")
    return result


def _ensure_directory(db_dir: Path) -> None:
    try:
        db_dir.mkdir(mode=CLIENT_DB_DIR_MODE, parents=True)
    except FileExistsError:
        return
    os.chmod(db_dir, CLIENT_DB_DIR_MODE)


def _ensure_database(db_dir: Path, certutil: str) -> None:
    if (db_dir / SQL_CERT_DB).exists():
        return
    _run_certutil(certutil, ["-N", "-d", _database(db_dir), "--empty-password"])
    log.info("Created the certificate database {directory}", directory=db_dir)


def _not_found(result: subprocess.CompletedProcess[bytes]) -> bool:
    return b"PR_FILE_NOT_FOUND_ERROR" in result.stderr or b"Could not find" in result.stderr


def trusted_server_certificates(db_dir: Path, certutil: str = "certutil") -> list[bytes]:
    """DER of every certificate stored under the ``stap-server`` nickname."""
    result = _run_certutil(
        certutil, ["-L", "-d", _database(db_dir), "-n", NICKNAME, "-a"], ok_codes=(0, 255))
    if result.returncode != 0:
        if _not_found(result):
            return []
        stderr = result.stderr.decode(errors="replace").strip()
        raise CertutilError(f"cannot list {NICKNAME} in {db_dir}: {stderr}")
    certificates = x509.load_pem_x509_certificates(result.stdout)
    return [certificate.public_bytes(Encoding.DER) for certificate in certificates]


def _make_databases_readable(db_dir: Path) -> None:
    """chmod ``*.db`` to 0644, as the client does after changing its DB."""
    for database in db_dir.glob("*.db"):
        os.chmod(database, CLIENT_DB_FILE_MODE)


def trust_certificate(cert_der_path: Path, db_dir: Path, certutil: str = "certutil") -> None:
    """Add the DER certificate at ``cert_der_path`` to ``db_dir`` as a trusted server.

    Creates the directory (0755) and an empty-password sql database when
    missing; skips the import when an identical certificate is present, so
    calling it again is harmless.  Raises :class:`CertutilError` on failure.
    """
    certificate_der = cert_der_path.read_bytes()
    _ensure_directory(db_dir)
    _ensure_database(db_dir, certutil)
    if certificate_der in trusted_server_certificates(db_dir, certutil):
        log.info("Certificate {path} is already trusted in {directory}",
                 path=cert_der_path, directory=db_dir)
    else:
        _run_certutil(certutil, ["-A", "-d", _database(db_dir), "-n", NICKNAME,
                                 "-t", TRUST_FLAGS, "-i", str(cert_der_path)])
        log.info("Certificate {path} added to the trusted servers in {directory}",
                 path=cert_der_path, directory=db_dir)
    _make_databases_readable(db_dir)
