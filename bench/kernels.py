"""What a release that is not installed costs its first client: the first
request (the server fetches the headers from the Debian archive, unpacks
them into its kernel store and compiles), the same request again (the
response cache), and a new script for the now stored release (a warm
compile), with an installed release's new script beside for comparison.

stapsrv runs as the unprivileged test user on loopback with a fresh kernel
store; the release is computed from apt (the ABI just below the newest
installed one that the archive has).  Run after ``make setup``, as root:

    .venv/bin/python bench/kernels.py [--rounds N]

Writes bench/results/kernels.md and kernels.json.  The fetch depends on
the network to deb.debian.org: the figure is one machine's, one day's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import load_average, make_client, new_script, say, timed_request, trust  # noqa: E402
from tests.helpers import header_release  # noqa: E402
from tests.helpers.archive_releases import older_abi_release  # noqa: E402
from tests.helpers.realserver import (  # noqa: E402
    ServerProcess,
    owned_directory,
    scratch_directory,
    start_stapsrv,
)

RESULTS = ROOT / "bench" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh stores (each fetches the release once)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    installed = header_release()
    if installed is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    release = older_abi_release()
    began, load_before = time.perf_counter(), load_average()
    rows: dict[str, list[float]] = {"first request (fetch + compile)": [],
                                    "same request again (cache)": [],
                                    "new script, stored release": [],
                                    "new script, installed release": []}
    #: Parts of the first request, from the server's log.
    parts: dict[str, list[float]] = {"fetch (apt-cache, download, unpack)": [],
                                     "System.map (image download, kallsyms)": [],
                                     "kernel configuration warm-up": []}
    homes: list[Path] = []
    for round_number in range(options.rounds):
        base = scratch_directory("bench-kernels-")
        server: ServerProcess | None = None
        try:
            store = owned_directory(base / "store")
            server = start_stapsrv(["--kernel-store", str(store)], installed)
            client = make_client(homes)
            trust(client, server.spec)
            timed_request(client, server.spec, installed, new_script())  # warm the installed
            script = new_script()
            say(f"round {round_number + 1}: first request for {release}")
            rows["first request (fetch + compile)"].append(
                timed_request(client, server.spec, release, script))
            rows["same request again (cache)"].append(
                timed_request(client, server.spec, release, script))
            rows["new script, stored release"].append(
                timed_request(client, server.spec, release, new_script()))
            rows["new script, installed release"].append(
                timed_request(client, server.spec, installed, new_script()))
            say(", ".join(f"{name} {values[-1]:.2f} s" for name, values in rows.items()))
            log = server.log()
            for name, pattern in (("fetch (apt-cache, download, unpack)",
                                   rf"Fetched kernel {re.escape(release)} in ([0-9.]+) s"),
                                  ("System.map (image download, kallsyms)",
                                   rf"Made the System.map of kernel {re.escape(release)} "
                                   r"in ([0-9.]+) s"),
                                  ("kernel configuration warm-up",
                                   rf"header for {re.escape(release)} ready in ([0-9.]+) s")):
                found = re.search(pattern, log)
                if found:
                    parts[name].append(float(found.group(1)))
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(base, ignore_errors=True)
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)
    data = {"release": release, "installed": installed, "rounds": options.rounds,
            "times": rows, "parts_of_first_request": parts, "medians": {name: statistics.median(v) for name, v in rows.items()},
            "load_before": load_before, "load_after": load_average(),
            "duration_s": time.perf_counter() - began, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [
        "# A kernel release that is not installed: first and second request", "",
        f"{data['date']}, release {release} fetched into a fresh kernel store "
        f"({options.rounds} round(s); installed release {installed} for comparison), real "
        f"4.8 client, load average before/after: {load_before} / {data['load_after']}, "
        f"took {data['duration_s']:.0f} s.", "",
        "| request | median (s) | min (s) | max (s) |", "|---|---|---|---|",
        *(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |"
          for name, v in rows.items()), "",
        "Of the first request (from the server's log): " + ", ".join(
            f"{name} {statistics.median(v):.1f} s" for name, v in parts.items() if v)
        + "; the rest is the compile itself.", "",
    ]
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "kernels.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "kernels.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
