"""``python3 -m stapsrv.cli.fleet secret [--force] [--user USER] FILE``:
make the secret that authenticates a fleet's cache entries.

Every server of the fleet needs the same file (copy it, keeping mode 0600
and its owner, the server's user).  Run as root, ``--user`` gives the new
file to that user.
"""

from __future__ import annotations

import argparse
import pwd
import sys
from pathlib import Path

from stapsrv.config.secret import SECRET_BYTES, SecretError, create_secret


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m stapsrv.cli.fleet",
                                     description="Tools for a stapsrv fleet cache.")
    actions = parser.add_subparsers(dest="action", required=True)
    secret = actions.add_parser(
        "secret", help=f"write a new fleet secret ({SECRET_BYTES} random bytes, mode 0600)")
    secret.add_argument("file", type=Path)
    secret.add_argument("--force", action="store_true",
                        help="replace an existing file (every server then needs the new one)")
    secret.add_argument("--user", help="owner of the new file (default: who runs this)")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    owner = None
    if arguments.user:
        try:
            entry = pwd.getpwnam(arguments.user)
        except KeyError:
            sys.stderr.write(f"fleet secret: no such user {arguments.user!r}\n")
            return 1
        owner = (entry.pw_uid, entry.pw_gid)
    try:
        create_secret(arguments.file, force=arguments.force, owner=owner)
    except SecretError as exc:
        sys.stderr.write(f"fleet secret: {exc}\n")
        return 1
    print(f"Wrote a new fleet secret to {arguments.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
