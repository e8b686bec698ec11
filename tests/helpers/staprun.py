"""The real ``staprun``'s check of a module signature, without loading it.

Before it inserts a module, ``staprun`` (4.8 or 5.5) verifies
``<module>.sgn`` against the signers trusted in
``SYSCONFDIR/systemtap/staprun`` and, with ``-vv``, says what it found
(``verify_module returns N``).  The test machines' kernel has no loadable
modules (``init_module`` fails with ENOSYS), so the insert that follows
fails harmlessly.

The check runs as root in a private mount namespace, over a tmpfs on the
client's ``SYSCONFDIR/systemtap``, so the machine's own trust is never
touched; the real client makes the server a trusted signer there
(``--trust-servers=signer,all-users``).  Two defects of the clients
themselves would stop the check before it looks at the signature, so they
are worked around:

- the database permission check insists on the legacy ``cert8.db``,
  ``key3.db`` and ``secmod.db``, which the client (writing NSS's SQL format)
  never creates, and the client makes the directory mode 0777, which the
  check refuses: empty legacy files and mode 0755 satisfy it;
- 5.5 checks the permissions of ``sql:<dir>`` as a relative path: it runs
  in a directory where ``sql:`` leads to ``/``.

Without these, neither client's ``staprun`` accepts any server's signature
on bookworm (``doc/differences.md``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.helpers import require, require_program
from tests.helpers.realserver import Client, run

#: ``verify_module`` results (staprun/modverify.h).
MODULE_OK = 1
MODULE_UNTRUSTED = 0
MODULE_CHECK_ERROR = -1
MODULE_ALTERED = -2

_SCRIPT = r"""
set -e
umask 022
spec=$1 stap=$2 staprun=$3 confdir=$4 module=$5 workdir=$6
mount -t tmpfs -o mode=0755 stapsrv-test "$confdir/systemtap"
"$stap" --use-server="$spec" --trust-servers=signer,all-users,no-prompt >/dev/null 2>&1
db="$confdir/systemtap/staprun"
chmod 0755 "$db"
for legacy in cert8.db key3.db secmod.db; do : > "$db/$legacy"; done
chmod 0644 "$db"/*
mkdir -p "$workdir"
cd "$workdir"
ln -sfn / sql:
"$staprun" -vv "$module" 2>&1 || true
"""

_VERDICT = re.compile(r"verify_module returns (-?\d+)")


async def staprun_verdict(client: Client, server_spec: str, module: Path) -> int:
    """What ``client``'s own ``staprun`` makes of ``module`` and its ``.sgn``
    when ``server_spec``'s certificate is its only trusted signer."""
    require(os.geteuid() == 0, "staprun's signature check needs root (a mount namespace)")
    unshare = require_program("unshare")
    kind = client.kind
    require(Path(kind.staprun).exists(), f"{kind.staprun} is not installed (run 'make setup')")
    out, err, code = await run(
        [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", _SCRIPT, "sh",
         server_spec, kind.stap, kind.staprun, kind.sysconfdir, str(module),
         str(client.dir / "staprun")],
        env=client.env(), cwd=client.cwd)
    text = (out + err).decode(errors="replace")
    found = _VERDICT.findall(text)
    if code != 0 or len(found) != 1:
        raise AssertionError(f"staprun did not check the signature (exit {code}):\n{text}")
    return int(found[0])
