"""What HAProxy in front costs a repeated request: the median ``-p4`` of a
cached script, straight to a stapsrv and through HAProxy (TCP mode, PROXY
protocol) to another stapsrv that listens with ``haproxy:tcp:``.

Both servers run as the unprivileged test user on loopback, warmed (trust,
the script compiled once each); then ``--runs`` requests each, interleaved
and rotated, with the real 4.8 client.  Run after ``make setup``, as root:

    .venv/bin/python bench/haproxy.py [--runs N]

Writes bench/results/haproxy.md and haproxy.json, and the HAProxy row of
the bench table (bench/results/summary.md).  Target: HAProxy adds at most
5 ms to the median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import (  # noqa: E402
    load_average,
    make_client,
    rotate,
    say,
    served_release,
    timed_request,
    trust,
)
from bench.table import update_summary  # noqa: E402
from tests.helpers.realhaproxy import Backend, HAProxy  # noqa: E402
from tests.helpers.realserver import ServerProcess, start_stapsrv  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCRIPT = 'probe begin { println("haproxy bench"); exit() }'
TARGET_MS = 5.0
DIRECT, PROXIED = "direct", "through HAProxy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="requests per path")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    release, runtime_args = served_release()
    began, load_before = time.perf_counter(), load_average()
    homes: list[Path] = []
    servers: list[ServerProcess] = []
    proxy: HAProxy | None = None
    proxy_dir = Path(tempfile.mkdtemp(prefix="bench-haproxy-"))
    try:
        direct = start_stapsrv(runtime_args, release)
        servers.append(direct)
        behind = start_stapsrv([*runtime_args, "--endpoint", "haproxy:tcp:0:interface=127.0.0.1"],
                               release)
        servers.append(behind)
        proxy = HAProxy(proxy_dir, [Backend("s0", behind.port)]).start()
        specs = {DIRECT: direct.spec, PROXIED: proxy.spec}
        clients = {name: make_client(homes) for name in specs}
        for name, spec in specs.items():
            say(f"warming {name} ({spec})")
            trust(clients[name], spec)
            timed_request(clients[name], spec, release, SCRIPT)
            timed_request(clients[name], spec, release, SCRIPT)
        times: dict[str, list[float]] = {name: [] for name in specs}
        for i in range(options.runs):
            for name in rotate(list(specs), i):
                times[name].append(timed_request(clients[name], specs[name], release, SCRIPT))
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(proxy_dir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    added_ms = (medians[PROXIED] - medians[DIRECT]) * 1000
    # On a loaded machine the medians carry the load's noise; the fastest
    # quarter of each path shows the cost with less of it.
    quartiles = {name: statistics.quantiles(values, n=4)[0] for name, values in times.items()}
    quartile_ms = (quartiles[PROXIED] - quartiles[DIRECT]) * 1000
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "release": release, "runs": options.runs,
            "times": times, "direct": medians[DIRECT], "proxied": medians[PROXIED],
            "added_ms": added_ms, "first_quartiles": quartiles,
            "first_quartile_added_ms": quartile_ms, "target_ms": TARGET_MS, "load_before": load_before,
            "load_after": load_average(), "duration_s": time.perf_counter() - began}
    lines = [
        "# HAProxy in front: the cost per repeated request", "",
        f"{data['date']}, kernel {release}, {options.runs} interleaved repeated `-p4` requests "
        f"per path (real 4.8 client, answers from the response cache); HAProxy in TCP mode "
        f"with `send-proxy` to a stapsrv on `haproxy:tcp:`; load average before/after "
        f"{load_before} / {data['load_after']}; took {data['duration_s']:.0f} s.", "",
        "| path | median (s) | min (s) | max (s) |", "|---|---|---|---|",
        *(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |"
          for name in times),
        "",
        f"HAProxy adds **{added_ms:+.1f} ms** to the median (target ≤ {TARGET_MS:.0f} ms: "
        f"**{'met' if added_ms <= TARGET_MS else 'not met'}**).  First quartiles: "
        f"{quartiles[DIRECT]:.3f} s direct, {quartiles[PROXIED]:.3f} s through HAProxy "
        f"({quartile_ms:+.1f} ms).", "",
    ]
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "haproxy.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "haproxy.md").write_text("\n".join(lines))
    update_summary(options.output)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
