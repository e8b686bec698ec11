"""What an arm64 release costs its first client on an amd64 server
(issue 30): the first request for the newest bookworm arm64 release (the
server fetches its headers through its arm64 apt, makes the kernel
configuration headers for it and cross-compiles), the same request again
(the response cache), a new arm64 script for the now stored release, and
a new script for the installed amd64 release beside it.

stapsrv runs as the unprivileged test user on loopback with a fresh
kernel store and ``--fetch-architectures arm64``; the release is the
newest ``6.1.0-*-arm64`` its arm64 lists name.  Run after ``make setup``,
as root:

    .venv/bin/python bench/arm64.py [--rounds N]

Writes bench/results/arm64.md and arm64.json.  The fetch depends on the
network; the figures are one machine's, one day's, with its load noted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import (  # noqa: E402
    BenchError,
    load_average,
    make_client,
    new_script,
    run_client,
    say,
    timed_request,
    trust,
)
from tests.helpers import header_release  # noqa: E402
from tests.helpers.realserver import (  # noqa: E402
    Client,
    ServerProcess,
    owned_directory,
    scratch_directory,
    start_stapsrv,
)
from tests.system.test_arm64 import newest_arm64  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FIRST, AGAIN = "arm64: first request (fetch + warm-up + cross-compile)", "arm64: same request again (cache)"
NEW_ARM64, NEW_AMD64 = "arm64: new script, stored release", "amd64: new script, installed release"


def timed_arm64(client: Client, spec: str, release: str, script: str) -> float:
    elapsed, result = run_client(client, spec, "-a", "arm64", "-r", release, "-p4", "-e",
                                 script)
    if result.returncode != 0:
        raise BenchError(f"arm64 request failed (rc {result.returncode}):\n{result.stderr}")
    return elapsed


def wait_for_arm64_lists(server: ServerProcess, seconds: float = 600.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any("Kernel store: fetching releases matching" in line and "-arm64" in line
               for line in server.log().splitlines()):
            return
        time.sleep(0.5)
    raise BenchError("the arm64 lists were not updated")


def one_round(rows: dict[str, list[float]], parts: dict[str, list[float]],
              homes: list[Path], installed: str) -> str:
    base = scratch_directory("bench-arm64-")
    server: ServerProcess | None = None
    try:
        store = owned_directory(base / "store")
        server = start_stapsrv(["--kernel-store", str(store), "--no-avahi",
                                "--fetch-architectures", "arm64"], installed)
        wait_for_arm64_lists(server)
        release = newest_arm64(store)
        client = make_client(homes)
        trust(client, server.spec)
        timed_request(client, server.spec, installed, new_script())  # warm the installed
        script = new_script()
        say(f"first request for {release}")
        rows[FIRST].append(timed_arm64(client, server.spec, release, script))
        rows[AGAIN].append(timed_arm64(client, server.spec, release, script))
        rows[NEW_ARM64].append(timed_arm64(client, server.spec, release, new_script()))
        rows[NEW_AMD64].append(timed_request(client, server.spec, installed, new_script()))
        say(", ".join(f"{name} {values[-1]:.2f} s" for name, values in rows.items()))
        log = server.log()
        for name, pattern in (("fetch (headers, common headers, the host's kbuild)",
                               rf"Fetched kernel {re.escape(release)} in ([0-9.]+) s"),
                              ("kernel configuration warm-up",
                               rf"header for {re.escape(release)} ready in ([0-9.]+) s")):
            found = re.search(pattern, log)
            if found:
                parts[name].append(float(found.group(1)))
        return release
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh stores (each fetches the release once)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    installed = header_release()
    if installed is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    began, load_before = time.perf_counter(), load_average()
    rows: dict[str, list[float]] = {FIRST: [], AGAIN: [], NEW_ARM64: [], NEW_AMD64: []}
    parts: dict[str, list[float]] = {"fetch (headers, common headers, the host's kbuild)": [],
                                     "kernel configuration warm-up": []}
    homes: list[Path] = []
    release = ""
    try:
        for _ in range(options.rounds):
            release = one_round(rows, parts, homes, installed)
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    data = {"release": release, "installed": installed, "rounds": options.rounds,
            "times": rows, "parts_of_first_request": parts,
            "medians": {name: statistics.median(v) for name, v in rows.items()},
            "load_before": load_before, "load_after": load_average(),
            "duration_s": time.perf_counter() - began, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [
        "# An arm64 release from an amd64 server: first request, and new scripts", "",
        f"{data['date']}, release {release} fetched into a fresh kernel store through "
        f"the server's arm64 apt ({options.rounds} round(s); installed amd64 release "
        f"{installed} beside it), real 4.8 client, load average before/after: "
        f"{load_before} / {data['load_after']}, took {data['duration_s']:.0f} s.", "",
        "| request | median (s) | min (s) | max (s) |", "|---|---|---|---|",
        *(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |"
          for name, v in rows.items()), "",
        "Of the first request (from the server's log): " + ", ".join(
            f"{name} {statistics.median(v):.1f} s" for name, v in parts.items() if v)
        + "; the rest is the cross-compile itself.", "",
        f"The machine ({os.cpu_count()} cores) was shared with other work while this ran "
        "(the load averages above): the figures are a loaded machine's, not a quiet one's.",
        "",
    ]
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "arm64.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "arm64.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
