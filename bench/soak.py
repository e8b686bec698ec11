"""Long-run behaviour of one server: many requests, then its memory,
descriptors and threads.

One stapsrv (the defaults: sandbox, response cache) as the unprivileged
test user on loopback; ``--clients`` concurrent lanes send ``--requests``
requests in all: mostly a repeated script (cache hits), every
``--compile-every``-th a new script (a compile), and every
``--hostile-every``-th instead a hostile connection (plain TCP closed at
once, TLS closed before the request, half a request then close).  New
scripts and every ``--real-every``-th repeated request go through the real
4.8 client; the other repeated requests are sent over TLS by the bench
itself, as the request archive the 4.8 client builds (the server does the
same work for them; the client's own ~0.3 CPU seconds per run would
otherwise make 10,000 requests take hours on a small machine), and their
answers are checked (a zip with rc 0).  The
server's resident memory (VmRSS), open descriptors and threads are read
from /proc: idle after the warm-up, after the first 1,000 requests, every
1,000 after that, at the end, and idle again 10 s after the end.  The log
is searched for errors beyond what the hostile cases explain.

Run after ``make setup``, as root:

    .venv/bin/python bench/soak.py [--requests N] [--clients N]

Writes bench/results/soak.md and soak.json, and the soak rows of the
bench table (bench/results/summary.md).  Targets: RSS at the end within
5 MB of its value after 1,000 requests; descriptors and threads back to
their idle count; no unexplained error in the log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    served_release,
    trust,
)
from bench.table import update_summary  # noqa: E402
from tests.helpers.faults import raw_request  # noqa: E402
from tests.helpers.rawclient import exchange, frame, send_request  # noqa: E402
from tests.helpers.vectors import members  # noqa: E402
from tests.helpers.realserver import ServerProcess, start_stapsrv  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REPEATED = 'probe begin { println("soak"); exit() }'
RSS_TARGET_MB = 5.0
#: Log lines a hostile connection may cause (they are the server's normal
#: account of a client that went away).
HOSTILE_LINES = re.compile(r"Expected \d+ bytes, got \d+ while reading client request|"
                           r"Timed out waiting for the request")
ERROR_LINES = re.compile(r"Error|error|Traceback|Unhandled|failure", re.ASCII)


def sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def hostile(kind: int, port: int, cafile: Path) -> None:
    if kind == 0:
        exchange(port, None, tls=False, read=False)  # connect, close
    elif kind == 1:
        exchange(port, cafile, b"", close_after_send=True)  # TLS, then close
    else:
        body = os.urandom(2000)
        exchange(port, cafile, frame(body)[:1000], close_after_send=True)  # half a request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--compile-every", type=int, default=500)
    parser.add_argument("--hostile-every", type=int, default=50)
    parser.add_argument("--real-every", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    release, runtime_args = served_release()
    began, load_before = time.perf_counter(), load_average()
    homes: list[Path] = []
    server: ServerProcess | None = None
    samples: list[dict[str, float]] = []
    failures: list[str] = []
    counts = {"cached": 0, "compiles": 0, "hostile": 0}
    lock = threading.Lock()
    try:
        server = start_stapsrv(runtime_args, release)
        cafile = server.base / "ssl" / "stap.cert"
        clients = [make_client(homes) for _ in range(options.clients)]
        for client in clients:
            trust(client, server.spec)
        _, warm = run_client(clients[0], server.spec, "-r", release, "-p4", "-e", REPEATED)
        if warm.returncode != 0:
            raise BenchError(f"warm-up failed: {warm.stderr}")
        repeated_body = raw_request(release, REPEATED, "-p4")
        time.sleep(3)
        idle = {**sample(server.pid), "after": 0}
        say(f"idle: {idle}")
        done = 0
        next_sample = 1000

        def one(index: int) -> None:
            nonlocal done, next_sample
            client = clients[index % len(clients)]
            if index % options.hostile_every == options.hostile_every - 1:
                hostile(index // options.hostile_every % 3, server.port, cafile)
                kind = "hostile"
            elif (index % options.compile_every == options.compile_every // 2
                  or index % options.real_every == 0):
                compile_ = index % options.compile_every == options.compile_every // 2
                script = new_script() if compile_ else REPEATED
                _, result = run_client(client, server.spec, "-r", release, "-p4", "-e", script)
                if result.returncode != 0:
                    with lock:
                        failures.append(f"request {index}: rc {result.returncode}: "
                                        f"{result.stderr[-300:]}")
                kind = "compiles" if compile_ else "cached"
            else:
                answer = send_request(server.port, cafile, repeated_body, timeout=120)
                try:
                    good = members(answer.data).get("rc") == b"0"
                except Exception:
                    good = False
                if not good:
                    with lock:
                        failures.append(f"request {index} (raw): {answer.outcome} "
                                        f"{answer.error}")
                kind = "cached"
            with lock:
                counts[kind] += 1
                done += 1
                if done >= next_sample:
                    next_sample += 1000
                    point = {**sample(server.pid), "after": done}
                    samples.append(point)
                    say(f"{done} requests: {point}, failures {len(failures)}")

        with ThreadPoolExecutor(options.clients) as pool:
            list(pool.map(one, range(options.requests)))
        end = {**sample(server.pid), "after": done}
        time.sleep(10)
        settled = {**sample(server.pid), "after": done}
        log = server.log()
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    error_lines = [line for line in log.splitlines()
                   if ERROR_LINES.search(line) and not HOSTILE_LINES.search(line)]
    first = samples[0] if samples else end
    growth = end["rss_mb"] - first["rss_mb"]
    data = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "release": release,
        "requests": options.requests, "clients": options.clients, "counts": counts,
        "client_failures": failures, "idle": idle, "samples": samples, "end": end,
        "settled": settled, "rss_growth_mb": growth, "rss_target_mb": RSS_TARGET_MB,
        "fds_back": settled["fds"] <= idle["fds"],
        "threads_back": settled["threads"] <= idle["threads"],
        "log_errors": error_lines[:50], "log_error_count": len(error_lines),
        "hostile_log_lines": len([line for line in log.splitlines()
                                  if HOSTILE_LINES.search(line)]),
        "load_before": load_before, "load_after": load_average(),
        "duration_s": time.perf_counter() - began,
    }
    met_rss = abs(growth) <= RSS_TARGET_MB
    lines = [
        "# Soak: one server, many requests", "",
        f"{data['date']}, kernel {release}, {options.requests} requests from "
        f"{options.clients} concurrent lanes: {counts['cached']} repeated "
        f"(cache hits; one in {options.real_every} through the real 4.8 client, the others "
        f"as its request archive sent by the bench), {counts['compiles']} new scripts "
        f"(real client), {counts['hostile']} hostile "
        f"connections; load average before/after {load_before} / {data['load_after']}; "
        f"took {data['duration_s']:.0f} s.", "",
        "| after requests | RSS (MB) | open fds | threads |", "|---|---|---|---|",
        f"| idle, before | {idle['rss_mb']:.1f} | {idle['fds']} | {idle['threads']} |",
        *(f"| {point['after']:.0f} | {point['rss_mb']:.1f} | {point['fds']:.0f} | "
          f"{point['threads']:.0f} |" for point in samples),
        f"| end | {end['rss_mb']:.1f} | {end['fds']:.0f} | {end['threads']:.0f} |",
        f"| idle, 10 s after | {settled['rss_mb']:.1f} | {settled['fds']:.0f} | "
        f"{settled['threads']:.0f} |", "",
        f"RSS growth from 1,000 requests to the end: **{growth:+.1f} MB** (target within "
        f"{RSS_TARGET_MB:.0f} MB: **{'met' if met_rss else 'not met'}**).  Descriptors back "
        f"to idle: **{'yes' if data['fds_back'] else 'no'}**; threads: "
        f"**{'yes' if data['threads_back'] else 'no'}**.  Client failures: "
        f"{len(failures)}.  Log lines with an error beyond the hostile cases: "
        f"{len(error_lines)} ({data['hostile_log_lines']} lines from hostile connections).",
        "",
        *(f"    {line}" for line in error_lines[:10]),
    ]
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "soak.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "soak.md").write_text("\n".join(lines) + "\n")
    update_summary(options.output)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
