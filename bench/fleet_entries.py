"""What a planted fleet cache entry does to a server's fleet cache lookup.

Against a real redis-server on loopback, this plants under a key, as
someone who can write to Redis but has no fleet secret would:

- an entry in the self-checked format (key and sha256: computable by
  anyone), and, where the tree seals entries, one sealed under another
  secret; each is looked up once: served or refused;
- a well-formed self-checked entry of a 256 MiB answer (made inside Redis
  with SETRANGE), looked up once: served or refused, the lookup process's
  peak RSS growth, and the GET/GETRANGE calls Redis saw.

``--tree`` picks the stapsrv checkout whose ``stapsrv.cache`` is measured
(default: this one), so an older checkout gives the "before" figures:

    .venv/bin/python bench/fleet_entries.py [--tree /work/main] [--output FILE]

Prints a Markdown table (and writes it to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_MEASURE = r'''
import inspect, json, os, resource, sys
tree, helpers, url, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path[:0] = [tree]
import redis
from stapsrv.cache import fleet
from stapsrv.cache.store import encode_entry
sealing = "secret" in inspect.signature(fleet.RedisCache).parameters
cache = fleet.RedisCache(url, None, timeout=60.0,
                         **({"secret": os.urandom(32)} if sealing else {}))
direct = redis.Redis(host="127.0.0.1", port=port)
rows = []
key = "c" * 64
direct.set(fleet.PREFIX + key, encode_entry(key, b"PK forged module"))
rows.append(["forged entry, self-checked format",
             "served" if cache.lookup(key) == b"PK forged module" else "refused", "", ""])
if sealing:
    from stapsrv.cache.sealed import seal
    direct.set(fleet.PREFIX + key, seal(os.urandom(32), key, b"PK forged module"))
    rows.append(["forged entry, sealed under another secret",
                 "served" if cache.lookup(key) == b"PK forged module" else "refused", "", ""])
# A well-formed self-checked entry whose answer is 256 MiB of zeros: the
# header is SET, and SETRANGE pads the rest with zeros inside Redis.
import hashlib
from stapsrv.cache.store import MAGIC
big, size = "d" * 64, 256 << 20
digest = hashlib.sha256()
for _ in range(size >> 20):
    digest.update(bytes(1 << 20))
header = MAGIC + bytes.fromhex(big) + digest.digest()
direct.set(fleet.PREFIX + big, header)
direct.setrange(fleet.PREFIX + big, len(header) + size - 1, b"\0")
direct.config_resetstat()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = cache.lookup(big)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
stats = direct.info("commandstats")
calls = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("get", "getrange"))
rows.append(["256 MiB answer, self-checked format",
             "served" if result is not None else "refused",
             f"{grown} MiB", str(calls)])
print(json.dumps(rows))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.helpers.realredis import RedisServer

    directory = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    store = RedisServer(directory).start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(arguments.tree.resolve()), str(ROOT),
             store.url, str(store.port)], capture_output=True, text=True, check=True)
    finally:
        store.stop()
        shutil.rmtree(directory, ignore_errors=True)
    import json
    rows = json.loads(done.stdout)
    revision = subprocess.run(["git", "-C", str(arguments.tree), "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Fleet cache lookup of planted entries, stapsrv.cache of {arguments.tree} "
             f"({revision or 'no git'})", "",
             "| planted entry | lookup | peak RSS growth | GET/GETRANGE calls |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if arguments.output:
        arguments.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
