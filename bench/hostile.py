"""Honest clients' latency while one hostile peer floods the server with
connections and storms it with fetches (issue 28).

One stapsrv (the defaults, a kernel store of its own in a scratch
directory, metrics on) runs as the unprivileged test user on loopback with
a descriptor limit of 1024 (soft and hard: a host's default, which the
server cannot raise).  Honest lanes, each a real 4.8 ``stap`` client with
its own SYSTEMTAP_DIR, reach it from 127.0.0.3, 127.0.0.4, ... (a real
client always connects from 127.0.0.1, so it goes through a plain TCP
relay, HAProxy without the PROXY protocol, that connects from the lane's
address); each lane runs ``--rounds`` rounds of ``--hits`` repeated
requests (cache hits) and one new script (a compile), one after another,
all lanes at once, and every request's latency is kept.

Phases (``--phases``; by default quiet, flood, quiet, storm, quiet, both,
quiet: the quiet figures are every quiet phase's pooled, so that they
follow what else the machine runs meanwhile):

- ``quiet``: nobody else; the reference figures;
- ``flood``: a peer at 127.0.0.2 holds ``--connections`` (3,000) idle TCP
  connections, no TLS, no request, and reopens every one the server closes
  (once a second), as tests/system/test_floods.py does;
- ``storm``: the same peer sends ``--storm`` (5) requests at once, each
  naming another kernel release the server has not stored (every release
  of the server's series and flavours the archive has and this machine has
  not installed, from apt at run time), and sends the next as soon as one
  is answered (after ``--storm-pause``), skipping releases it got;
- ``both``: the flood and the storm together.

The hostile peer runs in a process of its own (so the bench's timing
threads do not share its interpreter), on the same machine: its own CPU
is reported, and on a small machine it competes with the server for it.
Each hostile phase begins once the hostile peer is at work (the flood's
first pass made; the storm's first fetch started, from the server's log),
and the peer stops when the honest lanes are done; the next phase waits
until the server has settled (every fetch started has ended and its
System.map is made, even for a request the peer abandoned, and the
server has no more child processes than when idle: no translator, no
warm-up, no fetch step).  The server's kernel store keeps what the storm fetched.

Run after ``make setup``, as root (the fetches need deb.debian.org):

    .venv/bin/python bench/hostile.py [--rounds N] [--lanes N] [--phases quiet,flood]

Writes bench/results/hostile.md and hostile.json, and the hostile rows of
the bench table (bench/results/summary.md).  Target: in every hostile
phase the honest median latency of each kind within 1.5x of the quiet one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import (  # noqa: E402
    BenchError,
    is_stapsrv,
    load_average,
    make_client,
    new_script,
    process_tree,
    real_server_pid,
    run_client,
    say,
    served_release,
    trust,
)
from bench.table import update_summary  # noqa: E402
from tests.helpers import require_program  # noqa: E402
from tests.helpers.archive_releases import absent_releases  # noqa: E402
from tests.helpers.connflood import ConnectionFlood  # noqa: E402
from tests.helpers.faults import raw_request  # noqa: E402
from tests.helpers.rawclient import parse_response, send_request  # noqa: E402
from tests.helpers.realhaproxy import HAProxy, relay_config  # noqa: E402
from tests.helpers.realredis import free_port  # noqa: E402
from tests.helpers.realserver import (  # noqa: E402
    Client,
    ServerProcess,
    owned_directory,
    scratch_directory,
    start_stapsrv,
)

RESULTS = ROOT / "bench" / "results"
REPEATED = 'probe begin { println("hostile bench"); exit() }'
HOSTILE = "127.0.0.2"
#: The server's descriptor limit (issue 28: a host's default hard limit).
LIMIT = 1024
TARGET = 1.5
PHASES = ("quiet", "flood", "storm", "both")
KINDS = ("hit", "new")
#: How long a storm request may wait for its answer (a fetch, its symbols,
#: its warm-up and the compile take a minute or two on a busy machine).
STORM_WAIT = 1800.0
CLOSED_EARLY = re.compile(r'^stapsrv_connections_closed_early_total\{reason="(\w+)"\} (\S+)$',
                          re.M)


# --------------------------------------------------------------------------
# the hostile peer (in its own process)


class Storm:
    """``width`` requests at once from HOSTILE, each for a release not
    stored yet, renewed as they are answered, until :meth:`stop`."""

    def __init__(self, port: int, cafile: Path, releases: list[str], width: int,
                 pause: float) -> None:
        self.port, self.cafile, self.pause = port, cafile, pause
        self.releases = list(releases)
        self.stored: set[str] = set()
        self.outcomes: dict[str, int] = {}
        self.asked: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"storm-{n}")
                         for n in range(width)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _pick(self) -> str:
        with self._lock:
            left = [r for r in self.releases if r not in self.stored] or self.releases
            release = left[self._next % len(left)]
            self._next += 1
            self.asked[release] = self.asked.get(release, 0) + 1
            return release

    def _run(self) -> None:
        while not self._stop.is_set():
            release = self._pick()
            script = f'probe begin {{ println("storm {uuid.uuid4().hex}"); exit() }}'
            answer = send_request(self.port, self.cafile, raw_request(release, script, "-p4"),
                                  source=HOSTILE, timeout=STORM_WAIT)
            outcome = storm_outcome(answer.data, answer.outcome)
            with self._lock:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                if outcome == "compiled":
                    self.stored.add(release)
            self._stop.wait(self.pause)


def storm_outcome(data: bytes, outcome: str) -> str:
    """What became of one storm request, in a word or a line."""
    if not data:
        return f"no answer ({outcome})"
    try:
        response = parse_response(data)
    except Exception as exc:
        return f"unreadable answer ({type(exc).__name__})"
    if response.rc == 0:
        return "compiled"
    if "Not starting the fetch" in response.stderr:
        return "refused: over its share (--peer-fetches)"
    server_lines = [line for line in response.stderr.splitlines() if line.startswith("Server:")]
    first = server_lines[0] if server_lines else response.stderr.strip().splitlines()[-1:]
    return f"rc {response.rc}: {str(first)[:160]}"


def hostile_peer(port: int, cafile: Path, flood: int, storm: int, pause: float,
                 releases: list[str], ready: Any, stop: Any, report: Any) -> None:
    """The hostile peer's process: flood and/or storm until ``stop``."""
    flooder = ConnectionFlood(port, [HOSTILE], flood) if flood else None
    stormer = Storm(port, cafile, releases, storm, pause) if storm else None
    if flooder is not None:
        flooder.start()
        flooder.first_pass.wait(600)
    if stormer is not None:
        stormer.start()
    ready.set()
    stop.wait()
    held = flooder.held() if flooder is not None else 0
    if stormer is not None:
        stormer.stop()
    if flooder is not None:
        flooder.hold()
    usage = os.times()
    report.send({"flood_opened": flooder.opened if flooder else 0,
                "flood_failed": flooder.failed if flooder else 0, "flood_held_at_end": held,
                "storm_outcomes": dict(stormer.outcomes) if stormer else {},
                "storm_asked": dict(stormer.asked) if stormer else {},
                "cpu_s": usage.user + usage.system})
    report.close()
    os._exit(0)  # the storm's requests still waiting are abandoned with the process


# --------------------------------------------------------------------------
# the server and the honest lanes


def start_server(release: str, runtime_args: list[str], base: Path) -> tuple[ServerProcess, int]:
    prlimit = require_program("prlimit")
    metrics = free_port()
    store = owned_directory(base / "store")
    server = start_stapsrv([*runtime_args, "--kernel-store", str(store),
                            "--metrics", f"tcp:{metrics}:interface=127.0.0.1"],
                           release, prefix=[prlimit, f"--nofile={LIMIT}:{LIMIT}"])
    limits = Path(f"/proc/{server.pid}/limits").read_text()
    if f"Max open files            {LIMIT}" not in limits:
        raise BenchError(f"the server's descriptor limit is not {LIMIT}:\n{limits}")
    return server, metrics


def start_relay(server: ServerProcess, lanes: int, directory: Path) -> tuple[HAProxy, list[str]]:
    """The honest lanes' relay: lane i reaches the server from 127.0.0.(3+i)."""
    routes = [(free_port(), f"127.0.0.{3 + lane}") for lane in range(lanes)]
    relay = HAProxy(directory, [], config=relay_config(server.port, routes,
                                                       directory / "admin.sock"))
    relay.start()
    return relay, [f"127.0.0.1:{port}" for port, _ in routes]


def run_lane(client: Client, spec: str, release: str, rounds: int, hits: int,
             until: float) -> dict[str, Any]:
    """One honest lane: ``rounds`` of ``hits`` repeated requests and a new
    script, and more rounds until ``until`` (``time.monotonic()``)."""
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    failures: list[str] = []
    done = 0
    while done < rounds or time.monotonic() < until:
        done += 1
        for kind in ["hit"] * hits + ["new"]:
            script = REPEATED if kind == "hit" else new_script()
            elapsed, result = run_client(client, spec, "-r", release, "-p4", "-e", script)
            if result.returncode == 0:
                times[kind].append(elapsed)
            else:
                failures.append(f"{kind} from {spec}: rc {result.returncode}: "
                                f"{result.stderr.strip()[-300:]}")
    return {"times": times, "failures": failures}


def honest_round(lanes: list[tuple[Client, str]], release: str, rounds: int, hits: int,
                 seconds: float = 0.0) -> dict[str, Any]:
    """All lanes at once (each for at least ``seconds``)."""
    until = time.monotonic() + seconds
    with ThreadPoolExecutor(len(lanes)) as pool:
        results = list(pool.map(
            lambda lane: run_lane(lane[0], lane[1], release, rounds, hits, until), lanes))
    return {"times": {kind: [t for r in results for t in r["times"][kind]] for kind in KINDS},
            "failures": [f for r in results for f in r["failures"]]}


# --------------------------------------------------------------------------
# what the server and the machine did


def closed_early(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
        text = page.read().decode()
    return {reason: float(value) for reason, value in CLOSED_EARLY.findall(text)}


def cpu_seconds(pid: int) -> float:
    """The server process's own CPU time (utime + stime: its reactor,
    TLS, accepting and closing; not its translators or fetch children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """All CPUs' busy and total jiffies (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def log_counts(log: str) -> dict[str, int]:
    return {"fetches_started": len(re.findall(r"Fetching kernel \S+:", log)),
            "fetches_done": len(re.findall(r"Fetched kernel \S+ in", log)),
            "fetches_failed": len(re.findall(r"Cannot provide kernel \S+ for", log)),
            "symbols_made": len(re.findall(r"Made the System\.map of kernel|"
                                           r"No symbols for kernel", log)),
            "warmups_done": len(re.findall(r"Kernel configuration header for \S+ ready", log)),
            "refused_over_share": log.count("Not starting "),
            "room_lines": log.count("Closed connections to keep room for new clients"),
            "accept_failures": log.count("Cannot accept connections")}


#: The server's account of its kernel store work.
STORE_LINES = re.compile(r"Fetching kernel \S+:|Fetched kernel|Cannot provide kernel|"
                         r"Made the System\.map|Kernel configuration header for \S+ ready in|"
                         r"warm-up compile for kernel")


def store_lines(log: str) -> list[str]:
    """The kernel store's lines of the log, long package lists cut."""
    return [line if len(line) < 200 else line[:200] + " ..."
            for line in log.splitlines()
            if STORE_LINES.search(line) and "Not starting" not in line]


def most_fetches_at_once(lines: list[str]) -> int:
    """The most fetches under way at once, from the order of the log's
    ``Fetching kernel R:`` and ``Fetched kernel R`` / ``Cannot provide
    kernel R`` lines."""
    under_way: set[str] = set()
    most = 0
    for line in lines:
        if started := re.search(r"Fetching kernel (\S+):", line):
            under_way.add(started.group(1))
        elif ended := re.search(r"(?:Fetched|Cannot provide) kernel (\S+)", line):
            under_way.discard(ended.group(1))
        most = max(most, len(under_way))
    return most


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# --------------------------------------------------------------------------
# one phase


def wait_for_fetch(server: ServerProcess, before: int, bound: float) -> bool:
    """Until the server has started a fetch more than ``before`` (False
    after ``bound`` seconds: the storm got none through)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if log_counts(server.log())["fetches_started"] > before:
            return True
        time.sleep(0.2)
    return False


def start_peer(name: str, server: ServerProcess, options: argparse.Namespace,
               releases: list[str]) -> tuple[Any, Any, Any] | None:
    """The hostile peer of phase ``name`` at work (None in the quiet one)."""
    flood = options.connections if name in ("flood", "both") else 0
    storm = options.storm if name in ("storm", "both") else 0
    if not flood and not storm:
        return None
    log = server.log()
    # Releases an earlier phase's storm had fetched would be compiles, not fetches.
    releases = [r for r in releases if f"Fetched kernel {r} in" not in log] or releases
    context = multiprocessing.get_context("fork")
    ready, stop = context.Event(), context.Event()
    report, sender = context.Pipe(duplex=False)
    process = context.Process(target=hostile_peer, daemon=True, name="hostile-peer", args=(
        server.port, server.base / "ssl" / "stap.cert", flood, storm, options.storm_pause,
        releases, ready, stop, sender))
    process.start()
    sender.close()
    if not ready.wait(900):
        raise BenchError("the hostile peer never got to work")
    return process, stop, report


def stop_peer(peer: tuple[Any, Any, Any] | None) -> dict[str, Any]:
    if peer is None:
        return {}
    process, stop, report = peer
    stop.set()
    try:
        if not report.poll(120):
            raise BenchError("the hostile peer did not report")
        found: dict[str, Any] = report.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()
    return found


def settled(server: ServerProcess, pid: int, idle_children: int) -> bool:
    """Nothing left of a hostile phase: every fetch started has ended and
    its System.map is made, and the server runs no more processes than
    when idle (no translator, warm-up, apt-get, dpkg-deb or kallsyms
    child: what an abandoned request started goes on)."""
    counts = log_counts(server.log())
    ended = counts["fetches_done"] + counts["fetches_failed"]
    return (ended >= counts["fetches_started"]
            and counts["symbols_made"] >= counts["fetches_done"]
            and len(process_tree(pid)) - 1 <= idle_children)


def settle(server: ServerProcess, pid: int, idle_children: int,
           bound: float = 600.0) -> float:
    """Seconds until :func:`settled` (at most ``bound``)."""
    began = time.monotonic()
    while time.monotonic() - began < bound and not settled(server, pid, idle_children):
        time.sleep(1.0)
    return time.monotonic() - began


def run_phase(name: str, server: ServerProcess, metrics: int, pid: int,
              lanes: list[tuple[Client, str]], release: str, options: argparse.Namespace,
              releases: list[str]) -> dict[str, Any]:
    say(f"phase {name}: starting")
    counts, closed = log_counts(server.log()), closed_early(metrics)
    cpu, busy, load = cpu_seconds(pid), machine_busy(), load_average()
    peer = start_peer(name, server, options, releases)
    fetch_seen = None
    try:
        if name in ("storm", "both"):
            fetch_seen = wait_for_fetch(server, counts["fetches_started"], 120)
        say(f"phase {name}: hostile peer at work; honest lanes measuring")
        began = time.perf_counter()
        honest = honest_round(lanes, release, options.rounds, options.hits,
                              0.0 if peer is None else options.hostile_seconds)
        took = time.perf_counter() - began
    finally:
        hostile = stop_peer(peer)
    settling = settle(server, pid, options.idle_children) if peer is not None else 0.0
    busy_after = machine_busy()
    after, closed_after = log_counts(server.log()), closed_early(metrics)
    result = {
        "phase": name, "honest": honest, "duration_s": took, "settle_s": settling,
        "hostile": hostile, "storm_fetch_before_measuring": fetch_seen,
        "server_cpu_s": cpu_seconds(pid) - cpu,
        "machine_busy": (busy_after[0] - busy[0]) / max(1, busy_after[1] - busy[1]),
        "load_before": load, "load_after": load_average(),
        "log": {key: after[key] - counts[key] for key in after},
        "closed_early": {reason: closed_after.get(reason, 0) - closed.get(reason, 0)
                         for reason in closed_after},
        "stats": {kind: summary(honest["times"][kind]) for kind in KINDS},
    }
    say(f"phase {name}: {phase_line(result)}")
    return result


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": statistics.median(values) if values else None,
            "p90": percentile(values, 0.9), "max": max(values) if values else None}


def phase_line(result: dict[str, Any]) -> str:
    stats = result["stats"]
    return (", ".join(f"{kind} median {fmt(stats[kind]['median'])} s p90 "
                      f"{fmt(stats[kind]['p90'])} s (n {stats[kind]['n']})" for kind in KINDS)
            + f"; {len(result['honest']['failures'])} honest failures; "
            f"fetches started {result['log']['fetches_started']}; closed early "
            f"{result['closed_early']}; hostile {result['hostile']}")


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------
# report


def ratio(value: float | None, quiet: float | None) -> float | None:
    return None if value is None or not quiet else value / quiet


def phase_rows(data: dict[str, Any]) -> list[str]:
    rows = ["| phase | cache hit: median (s) | p90 (s) | median × quiet | new script: median (s) "
            "| p90 (s) | median × quiet | honest failures | within 1.5× |",
            "|---|---|---|---|---|---|---|---|---|"]
    reference = data["quiet_reference"]
    if reference is not None:
        rows.append("| **quiet, all quiet phases pooled** | " + " | ".join(
            f"**{fmt(reference[kind]['median'])}** | {fmt(reference[kind]['p90'])} | 1×"
            for kind in KINDS) + " | — | — |")
    for name, result in data["phases"].items():
        stats, cells = result["stats"], []
        for kind in KINDS:
            share = result.get("ratios", {}).get(kind)
            cells += [fmt(stats[kind]["median"]), fmt(stats[kind]["p90"]),
                      "—" if share is None else f"{share:.2f}×"]
        met = result.get("met")
        rows.append(f"| {name} | {' | '.join(cells)} | {len(result['honest']['failures'])} | "
                    f"{'—' if met is None else ('**met**' if met else '**not met**')} |")
    return rows


def hostile_rows(data: dict[str, Any]) -> list[str]:
    rows = ["| phase | flood: connections opened (failed), held at the end | storm: requests "
            "by outcome | fetches started (done) | refused over the share | closed early "
            "(oldest / full / peer) | EMFILE lines | server process CPU (s) | hostile peer CPU (s) | "
            "machine busy | measured for (s) | settled after (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in data["phases"].items():
        hostile, log, closed = result["hostile"], result["log"], result["closed_early"]
        flood = (f"{hostile['flood_opened']} ({hostile['flood_failed']}), "
                 f"{hostile['flood_held_at_end']}" if hostile.get("flood_opened") else "—")
        storm = "; ".join(f"{outcome}: {n}" for outcome, n in
                          sorted(hostile.get("storm_outcomes", {}).items())) or "—"
        rows.append(
            f"| {name} | {flood} | {storm} | {log['fetches_started']} ({log['fetches_done']}) | "
            f"{log['refused_over_share']} | {closed.get('oldest', 0):g} / "
            f"{closed.get('full', 0):g} / {closed.get('peer', 0):g} | "
            f"{log['accept_failures']} | {result['server_cpu_s']:.1f} | "
            f"{fmt(hostile.get('cpu_s'), 1)} | {result['machine_busy']:.0%} | "
            f"{result['duration_s']:.0f} | {result.get('settle_s', 0):.0f} |")
    return rows


def render(data: dict[str, Any]) -> str:
    info = data["info"]
    verdict = [f"{name}: {'met' if r['met'] else 'not met'}"
               for name, r in data["phases"].items() if r.get("met") is not None]
    lines = [
        "# A hostile peer: honest clients' latency under a connection flood and a fetch storm",
        "", f"{info['date']}, kernel {info['release']}; stapsrv with its defaults, a fresh "
        f"kernel store, descriptor limit {LIMIT} (soft and hard); {info['lanes']} honest lanes "
        f"(real 4.8 client, from {', '.join(info['honest_addresses'])} through a plain TCP "
        f"relay), each {info['rounds']} rounds of {info['hits']} repeated requests (cache hits) "
        f"and one new script (in a hostile phase, more rounds until {info['hostile_seconds']:g} s "
        f"have passed), all lanes at once; the hostile peer at {HOSTILE}: a flood of "
        f"{info['connections']} idle connections reopened as they are closed, and a storm of "
        f"{info['storm']} requests at once for releases not stored "
        f"({len(info['releases'])} from the archive: {', '.join(info['releases'][:6])}, ...). "
        f"{info['cpus']} CPUs; load average before/after {info['load_before']} / "
        f"{info['load_after']}; took {info['duration_s']:.0f} s.", "",
        *(["**Note:** " + info["note"], ""] if info.get("note") else []),
        f"Target: honest medians within {TARGET}× of the quiet ones in every hostile phase: "
        f"{'; '.join(verdict) or 'no hostile phase ran'}.", "",
        *phase_rows(data), "", "Each phase's ratios are to the pooled quiet figures.", "",
        "What the hostile peer did and what it cost the server, "
        "counted over each phase from the start of its hostile peer until the server settled "
        "after it (from the server's log "
        "and metrics; the server process's CPU is the twistd process alone, its reactor, "
        "TLS and connections, not its translators or fetch steps; the hostile peer's CPU is "
        "its process's, on the same machine; machine busy is all CPUs, every process on the "
        "machine included, other workers' too):", "", *hostile_rows(data), "",
    ]
    lines += [f"Fetches under way at once, at most (from the log): "
              f"{data['most_fetches_at_once']}.  The server's account of its kernel store "
              "work (the log's lines, whole run):", "",
              *(f"    {line}" for line in data["store_lines"][:30]), ""]
    failures = [f for r in data["phases"].values() for f in r["honest"]["failures"]]
    if failures:
        lines += ["Honest failures (first 5):", "", *(f"    {f}" for f in failures[:5]), ""]
    return "\n".join(lines)


def quiet_reference(phases: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The quiet figures: every quiet phase's latencies pooled (quiet
    phases between the hostile ones follow the machine's other load)."""
    quiet = [r for r in phases.values() if r["phase"] == "quiet"]
    if not quiet:
        return None
    return {kind: summary([t for r in quiet for t in r["honest"]["times"][kind]])
            for kind in KINDS}


def judge(phases: dict[str, dict[str, Any]], reference: dict[str, Any] | None) -> None:
    """Each phase's ratios to the quiet reference; a hostile phase's
    ``met``: both medians within TARGET of it, and no honest request
    failed."""
    if reference is None:
        return
    for result in phases.values():
        ratios = [ratio(result["stats"][kind]["median"], reference[kind]["median"])
                  for kind in KINDS]
        result["ratios"] = dict(zip(KINDS, ratios))
        if result["phase"] != "quiet":
            result["met"] = (all(r is not None and r <= TARGET for r in ratios)
                             and not result["honest"]["failures"])


# --------------------------------------------------------------------------


def options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", type=int, default=3, help="honest clients at once (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per lane and phase (3)")
    parser.add_argument("--hits", type=int, default=4, help="cache hits per round (4)")
    parser.add_argument("--hostile-seconds", type=float, default=75.0,
                        help="a hostile phase's lanes go on with more rounds until this "
                        "long (75: a storm's fetch, its System.map and its warm-up)")
    parser.add_argument("--connections", type=int, default=3000,
                        help="the flood's idle connections (3000)")
    parser.add_argument("--storm", type=int, default=5, help="storm requests at once (5)")
    parser.add_argument("--storm-pause", type=float, default=0.5,
                        help="seconds a storm thread waits after an answer (0.5)")
    parser.add_argument("--phases", default="quiet,flood,quiet,storm,quiet,both,quiet",
                        help=f"comma-separated, from {', '.join(PHASES)}, repeats allowed "
                        "(the quiet figures are all quiet phases pooled)")
    parser.add_argument("--note", default="", help="a sentence for the results file")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def warm_up(lanes: list[tuple[Client, str]], release: str) -> None:
    for client, spec in lanes:
        trust(client, spec)
    warm = honest_round(lanes, release, 1, 1)
    if warm["failures"]:
        raise BenchError(f"warm-up failed: {warm['failures'][0]}")


def results_data(options: argparse.Namespace, release: str, releases: list[str],
                 results: dict[str, dict[str, Any]], log: str, began: float,
                 load_before: str) -> dict[str, Any]:
    """What hostile.json holds: the run, every phase judged, the log's lines."""
    reference = quiet_reference(results)
    judge(results, reference)
    addresses = [f"127.0.0.{3 + lane}" for lane in range(options.lanes)]
    return {
        "info": {"date": time.strftime("%Y-%m-%d %H:%M"), "release": release,
                 "cpus": os.cpu_count(), "lanes": options.lanes, "rounds": options.rounds,
                 "hits": options.hits, "hostile_seconds": options.hostile_seconds,
                 "connections": options.connections,
                 "storm": options.storm, "storm_pause": options.storm_pause,
                 "releases": releases, "honest_addresses": addresses,
                 "honest_addresses_seen": [a for a in addresses
                                           if f"Accepted connection from {a}:" in log],
                 "descriptor_limit": LIMIT, "server_children_idle": options.idle_children,
                 "target": TARGET, "note": options.note,
                 "load_before": load_before, "load_after": load_average(),
                 "duration_s": time.perf_counter() - began},
        "phases": results, "quiet_reference": reference,
        "room_lines": [line for line in log.splitlines()
                       if "Closed connections to keep room" in line][:20],
        "store_lines": store_lines(log),
        "most_fetches_at_once": most_fetches_at_once(store_lines(log)),
    }


def main() -> int:
    options = options_parser().parse_args()
    phases = [p for p in options.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    release, runtime_args = served_release()
    releases = absent_releases()
    began, load_before = time.perf_counter(), load_average()
    base = scratch_directory("bench-hostile-")
    homes: list[Path] = []
    server: ServerProcess | None = None
    relay: HAProxy | None = None
    results: dict[str, dict[str, Any]] = {}
    try:
        server, metrics = start_server(release, runtime_args, base)
        pid = real_server_pid(server, is_stapsrv)
        relay, specs = start_relay(server, options.lanes, Path(tempfile.mkdtemp(
            prefix="bench-relay-")))
        lanes = [(make_client(homes), spec) for spec in specs]
        warm_up(lanes, release)
        time.sleep(2.0)
        options.idle_children = len(process_tree(pid)) - 1
        for number, name in enumerate(phases):
            seen = phases[:number + 1].count(name)
            label = name if seen == 1 else f"{name} {seen}"
            results[label] = run_phase(name, server, metrics, pid, lanes, release, options,
                                       releases)
        log = server.log()
    finally:
        if relay is not None:
            relay.stop()
            shutil.rmtree(relay.directory, ignore_errors=True)
        if server is not None:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    data = results_data(options, release, releases, results, log, began, load_before)
    report = render(data)
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "hostile.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "hostile.md").write_text(report)
    update_summary(options.output)
    print(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
