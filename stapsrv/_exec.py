"""Exec shim for the translator: new session, then exec.

Run as ``python -I -S _exec.py -- PROGRAM ARGS...``.  ``os.setsid()`` makes
the translator the leader of its own process group, so the server can end
it together with every ``make`` and ``gcc`` it starts.  Only the standard
library is imported: this runs before every compile.
"""

import os
import sys


def main(argv: list) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: _exec.py -- PROGRAM [ARGS...]\n")
        sys.exit(127)
    os.setsid()
    program = argv[2]
    try:
        os.execv(program, argv[2:])
    except OSError as exc:
        sys.stderr.write("Failed spawning translator {}: {}\n".format(program, exc.strerror))
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv)
