"""What the translator sandbox costs: the first request of a new script,
stapsrv with its sandbox (the default) against stapsrv with ``--no-sandbox``.

Both run as the unprivileged test user on loopback, with the same release
and runtime, warmed (trust, a first compile, so the kernel configuration
header exists for both); then ``--runs`` new scripts each, interleaved and
rotated, with the real 4.8 client.  Run after ``make setup``, as root:

    .venv/bin/python bench/sandbox.py [--runs N]

Writes bench/results/sandbox.md and sandbox.json.  Target: the sandbox adds
under 5% to the median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import (  # noqa: E402
    load_average,
    make_client,
    new_script,
    rotate,
    say,
    served_release,
    timed_request,
    trust,
)
from tests.helpers.realserver import ServerProcess, start_stapsrv  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SANDBOXED, UNSANDBOXED = "stapsrv (sandbox)", "stapsrv --no-sandbox"
TARGET = 1.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="new scripts per server")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    release, runtime_args = served_release()
    began, load_before = time.perf_counter(), load_average()
    homes: list[Path] = []
    servers: dict[str, ServerProcess] = {}
    try:
        servers[SANDBOXED] = start_stapsrv([*runtime_args, "--no-cache"], release)
        servers[UNSANDBOXED] = start_stapsrv([*runtime_args, "--no-cache", "--no-sandbox"],
                                             release)
        clients = {name: make_client(homes) for name in servers}
        for name, server in servers.items():
            say(f"warming {name} on {server.spec}")
            trust(clients[name], server.spec)
            timed_request(clients[name], server.spec, release, new_script())
        times: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(options.runs):
            for name in rotate(list(servers), i):
                times[name].append(
                    timed_request(clients[name], servers[name].spec, release, new_script()))
            say(f"run {i + 1}/{options.runs}: " + ", ".join(
                f"{name} {times[name][-1]:.2f} s" for name in servers))
    finally:
        for server in servers.values():
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians[SANDBOXED] / medians[UNSANDBOXED]
    data = {"release": release, "runs": options.runs, "times": times, "medians": medians,
            "ratio": ratio, "target": TARGET, "load_before": load_before,
            "load_after": load_average(), "duration_s": time.perf_counter() - began,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [
        "# The translator sandbox's cost per new-script compile", "",
        f"{data['date']}, kernel {release}, {options.runs} interleaved new scripts per server "
        f"(real 4.8 client, `--no-cache`), load average before/after: {load_before} / "
        f"{data['load_after']}, took {data['duration_s']:.0f} s.", "",
        "| server | median (s) | min (s) | max (s) |", "|---|---|---|---|",
        *(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |"
          for name in servers),
        "",
        f"Sandbox / no sandbox: **{ratio:.3f}×** (target < {TARGET:.2f}×: "
        f"**{'met' if ratio < TARGET else 'not met'}**).", "",
    ]
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "sandbox.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "sandbox.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
