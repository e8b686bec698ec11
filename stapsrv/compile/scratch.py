"""A request's scratch directory under ``$TMPDIR`` (``--tmpdir``): the
request's members in ``request/``, the answer in ``response/``, the
translator's module directory in that."""

from __future__ import annotations

import tempfile
from pathlib import Path

#: The translator's --tmpdir, a name the client and the testsuite rely on.
MODULE_DIR = "stap000000"


def make_scratch(tmpdir: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="stap-server.", dir=tmpdir))
    (scratch / "request").mkdir(mode=0o700)
    (scratch / "response").mkdir(mode=0o700)
    return scratch
