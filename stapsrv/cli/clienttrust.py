"""``python -m stapsrv.cli.clienttrust [--ssl DIR | --user USER]
[--all-users | --signer] [--into DB_DIR]``: trust this server for clients
that cannot do it themselves.

SystemTap 5.1 and older clients on NSS 3.101 or later (Debian trixie's 5.1
on its NSS 3.110) cannot trust any server with ``--trust-servers``: NSS
reads every untrusted stap server certificate as ``SEC_ERROR_UNKNOWN_ISSUER``
and their trust code knows only ``SEC_ERROR_CA_CERT_INVALID``
(:mod:`stapsrv.core.tlsrefusal`; no certificate shape changes that, see
doc/differences.md).  The trust itself is what ``--trust-servers`` would
have written: the server's certificate under the nickname ``stap-server``
with trust ``P,P,P`` in the client's NSS database.

By default the command prints a shell script to run on the client machine
(as the user whose clients should trust the server; ``--all-users`` and
``--signer`` as root): it holds the certificate itself, so it can be sent
by any channel the admin trusts.  ``--into DB_DIR`` writes the trust into
that NSS database directly instead (a client database on this machine).
The certificate is read from the server's ssl directory: ``--ssl DIR``,
else that of ``--user`` (default ``stap-server``),
``~USER/.systemtap/ssl/server``.
"""

from __future__ import annotations

import argparse
import pwd
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stapsrv.identity.certs import cert_serial_text
from stapsrv.identity.store import CERT_FILE
from stapsrv.identity.trust import NICKNAME, TRUST_FLAGS, CertutilError, trust_certificate

#: Where each kind of trust lives on a client machine (shell words).
DATABASES = {
    "user": '"${SYSTEMTAP_DIR:-$HOME/.systemtap}/ssl/client"',
    "all-users": "/etc/systemtap/ssl/client",
    "signer": "/etc/systemtap/staprun",
}
_WHO = {"user": "the SystemTap clients of the account that runs it",
        "all-users": "every user's SystemTap clients on the machine (run it as root)",
        "signer": "staprun on the machine, as a module signer (run it as root)"}


def ssl_directory(arguments: argparse.Namespace) -> Path:
    if arguments.ssl:
        return Path(arguments.ssl)
    try:
        home = pwd.getpwnam(arguments.user).pw_dir
    except KeyError:
        raise SystemExit(f"No user {arguments.user}: name the server's ssl directory "
                         "with --ssl DIR")
    return Path(home) / ".systemtap" / "ssl" / "server"


def trust_script(certificate: x509.Certificate, kind: str) -> str:
    """A shell script that trusts ``certificate`` as ``--trust-servers``
    would (``kind``: user, all-users or signer)."""
    pem = certificate.public_bytes(Encoding.PEM).decode("ascii")
    return (
        "#!/bin/sh\n"
        f"# Trusts the stap server with certificate {cert_serial_text(certificate)} for\n"
        f"# {_WHO[kind]}.\n"
        "# Needs certutil (Debian: libnss3-tools).\n"
        "set -e\n"
        f"db={DATABASES[kind]}\n"
        'mkdir -p "$db"\n'
        '[ -e "$db/cert9.db" ] || certutil -N -d "sql:$db" --empty-password\n'
        f'certutil -A -d "sql:$db" -n {NICKNAME} -t {TRUST_FLAGS} -a <<\'CERTIFICATE\'\n'
        f"{pem}"
        "CERTIFICATE\n"
        'chmod 0644 "$db"/*.db\n')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stapsrv.cli.clienttrust",
        description="Trust this server for SystemTap clients whose --trust-servers cannot "
                    "(5.1 and older on NSS 3.101 or later, such as Debian trixie's).")
    parser.add_argument("--ssl", help="the server's ssl directory (its --ssl)")
    parser.add_argument("--user", default="stap-server",
                        help="else that of this user (default stap-server)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--all-users", dest="kind", action="store_const", const="all-users",
                      help="for every user of the client machine")
    kind.add_argument("--signer", dest="kind", action="store_const", const="signer",
                      help="as a module signer for staprun")
    parser.add_argument("--into", metavar="DB_DIR",
                        help="write the trust into this NSS database now instead of "
                             "printing a script")
    return parser


def main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    path = ssl_directory(arguments) / CERT_FILE
    try:
        certificate = x509.load_der_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        print(f"clienttrust: cannot read the server's certificate {path}: {exc}",
              file=sys.stderr)
        return 1
    if arguments.into is None:
        sys.stdout.write(trust_script(certificate, arguments.kind or "user"))
        return 0
    try:
        trust_certificate(path, Path(arguments.into))
    except (CertutilError, OSError) as exc:
        print(f"clienttrust: {exc}", file=sys.stderr)
        return 1
    print(f"Trusted {cert_serial_text(certificate)} in {arguments.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
