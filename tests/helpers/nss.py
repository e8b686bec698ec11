"""Reading NSS databases with certutil."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


_TRUST_LINE = re.compile(r"^(?P<nickname>\S.*?)\s{2,}(?P<trust>\S*,\S*,\S*)\s*$")


def list_database(certutil: str, db_dir: Path) -> list[tuple[str, str]]:
    """(nickname, trust) rows of ``certutil -L``."""
    output = subprocess.run([certutil, "-L", "-d", f"sql:{db_dir}"], capture_output=True,
                            check=True, text=True, timeout=60).stdout
    rows = []
    for line in output.splitlines():
        match = _TRUST_LINE.match(line)
        if match:
            rows.append((match["nickname"], match["trust"]))
    return rows
