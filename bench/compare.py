"""Benchmark stapsrv against the real stap-serverd 4.8 and 5.5 with the real stap client.

The peers are Debian bookworm's stap-serverd 4.8 and upstream's stap-serverd
5.5 (/opt/stap55, installed by `make setup`).  The client for every server is
the 4.8 `stap` (what bookworm users run).  All servers run as the unprivileged
test user on loopback with the same kernel release on the same machine; all
are warmed, and every measure interleaves the servers (A, B, C, A, B, C, ...
with the order rotated each round) so that machine noise hits all alike.
stapsrv and stap-serverd 4.8 run the 4.8 translator with the same fixed
runtime (-R); stap-serverd 5.5 runs its own 5.5 translator with its own
tapsets and runtime (which builds against bookworm's headers unfixed), so it
gets no -R.  Rows that include the translator's work ((b), (e)) therefore
compare server plus translator against 5.5.  Run after `make setup`, as root:

    .venv/bin/python bench/compare.py [--runs N] [--quick]

Measures (each client has its own SYSTEMTAP_DIR that trusted its server):

  (a) a repeated `-p4` request (median client latency);
  (b) the first request of a new script (unique script text each run);
  (c) 8 and 16 concurrent clients, a fixed number of requests, requests/s:
      "mixed" (3/4 repeated, 1/4 new scripts) and "repeated" only;
  (d) server resident memory (VmRSS of the server process itself): idle
      after warm-up, and peak while (c) runs (sampled every 50 ms);
  (e) server overhead per request: (a) minus the translator's own warm run
      time (the same `stap -r REL -R RUNTIME -p4 -e SCRIPT` run directly as
      the server user with the server's environment; for stap-serverd 5.5
      its own `/opt/stap55/bin/stap -r REL -p4 -e SCRIPT`).  When stapsrv has a
      response cache, a second stapsrv started with --no-cache stands in for
      it here (a cached answer runs no translator at all);
  (f) the floor: the same client against bench/replay.py, a TLS server that
      answers with a prebuilt response archive (captured from stapsrv with
      the client's -k), i.e. what no server can beat with this client.

stapsrv is the one installed in the venv (twistd finds the plugin there), not
the source tree: run `make venv` first to bench the current code.  A fresh
--cache-dir is passed when the option exists, so each run starts cold.

Writes bench/results/summary.md (table with targets), summary.json (raw
numbers) and summary.png (matplotlib; installed into the running venv at run
time if missing: it is not a package dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table import update_summary  # noqa: E402
from tests.helpers import header_release  # noqa: E402
from tests.helpers.realserver import (  # noqa: E402
    CLIENT_55,
    STAP,
    STAP_SERVERD,
    STAP_SERVERD_55,
    Client,
    ServerProcess,
    as_server_user,
    fixed_runtime_for,
    scratch_directory,
    server_environment,
    start_stap_serverd,
    start_stapsrv,
    test_user,
    venv_bin,
)

RESULTS = ROOT / "bench" / "results"
SCRIPT = 'probe begin { println("bench"); exit() }'
SERVERD, SERVERD55 = "stap-serverd 4.8", "stap-serverd 5.5"
STAPSRV, FLOOR = "stapsrv", "floor (replay)"
#: A second stapsrv without its response cache, for (e): with the cache a
#: repeated request never runs the translator, so "latency minus translator"
#: says nothing about the server's own overhead.
STAPSRV_NC = "stapsrv --no-cache"
#: Names server_environment() was given for each server (its SYSTEMTAP_DIR).
ENV_NAME = {SERVERD: "serverd", SERVERD55: "serverd55", STAPSRV: "stapsrv",
            STAPSRV_NC: "stapsrv"}


@dataclass(frozen=True)
class Peer:
    """An original stap-serverd that stapsrv is compared with."""

    name: str
    #: In the ratio column's header: "stapsrv / {short}".
    short: str
    program: str
    #: The translator it runs, for (e).
    translator: str
    #: Whether it gets stapsrv's fixed runtime (-R): only the 4.8 translator
    #: needs it; 5.5 brings its own runtime.
    fixed_runtime: bool


PEERS = (Peer(SERVERD, "serverd 4.8", STAP_SERVERD, STAP, True),
         Peer(SERVERD55, "serverd 5.5", STAP_SERVERD_55, CLIENT_55.stap, False))
PEER_NAMES = tuple(p.name for p in PEERS)
#: The servers every measure interleaves (the floor joins some).
MEASURED = (*PEER_NAMES, STAPSRV)
SAMPLE_INTERVAL = 0.05
_KEEPING = re.compile(r'Keeping temporary directory "([^"]+)"')


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# clients, scripts, processes


_counter = 0
_counter_lock = threading.Lock()


def new_script() -> str:
    """A script no server has seen: unique text, so a new module hash."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f'probe begin {{ println("bench new {n} {uuid.uuid4().hex}"); exit() }}'


def make_client(homes: list[Path]) -> Client:
    home = Path(tempfile.mkdtemp(prefix="bench-client-"))
    homes.append(home)
    client = Client(home)
    (home / "tmp").mkdir()
    return client


def run_client(client: Client, spec: str,
               *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = client.env({"TMPDIR": str(client.dir / "tmp")})
    started = time.perf_counter()
    result = subprocess.run([STAP, f"--use-server={spec}", *args], env=env, cwd=client.cwd,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return time.perf_counter() - started, result


def timed_request(client: Client, spec: str, release: str, script: str) -> float:
    elapsed, result = run_client(client, spec, "-r", release, "-p4", "-e", script)
    if result.returncode != 0:
        raise BenchError(f"client failed against {spec} (rc {result.returncode}):\n"
                         f"{result.stderr}")
    return elapsed


def check_module(client: Client, name: str) -> None:
    """The warm-up requests really brought a module back."""
    if not any(path.endswith(".ko") for path in client.modules()):
        raise BenchError(f"no module in {client.cwd} after requests to {name}")


def trust(client: Client, spec: str) -> None:
    _, result = run_client(client, spec, "--trust-servers=ssl,no-prompt")
    if result.returncode != 0:
        raise BenchError(f"trusting {spec} failed:\n{result.stderr}")


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, breadth first (shallowest first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        order.append(pid)
        queue.extend(sorted(children.get(pid, [])))
    return order


def real_server_pid(server: ServerProcess, is_server: Callable[[str, list[str]], bool]) -> int:
    """The server process itself: ServerProcess.pid may be a wrapper."""
    for pid in process_tree(server.pid):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if is_server(exe, argv):
            return pid
    raise BenchError(f"no server process found under pid {server.pid} ({server.name})")


def is_stapsrv(exe: str, argv: list[str]) -> bool:
    return "python" in os.path.basename(exe) and any(a.endswith("/twistd") for a in argv[:3])


def is_serverd(program: str) -> Callable[[str, list[str]], bool]:
    """Matches the stap-serverd at ``program`` (4.8's and 5.5's share a basename)."""
    wanted = os.path.realpath(program)

    def match(exe: str, argv: list[str]) -> bool:
        return os.path.realpath(exe) == wanted
    return match


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def mb(kb: float) -> float:
    return kb * 1024 / 1e6


class RssSampler:
    """Samples VmRSS of one process every SAMPLE_INTERVAL in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter() - start, status_kb(self.pid, "VmRSS")))
            except (OSError, BenchError):
                return
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# the measured things


class Target:
    """One server under test with its clients."""

    def __init__(self, name: str, server: ServerProcess, client: Client,
                 translator: list[str]) -> None:
        self.name = name
        self.server = server
        self.client = client
        #: The translator this server runs, with its -r and -R: ``stap -r REL ...``.
        self.translator = translator
        self.pool: list[Client] = []
        self.pid = 0


def translator_run(target: Target, script: str) -> float:
    """The target's translator alone, as the server user with the server's environment."""
    env = server_environment(target.server.base, ENV_NAME[target.name])
    argv = as_server_user([*target.translator, "-p4", "-e", script])
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=env["TMPDIR"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(f"direct translator run {target.translator[0]} ({target.name} "
                         f"environment) failed:\n{result.stderr}")
    return elapsed


def concurrent_batch(target: Target, spec: str, release: str, n_clients: int,
                     kinds: list[str]) -> dict[str, Any]:
    """``len(kinds)`` requests from ``n_clients`` clients at once."""
    jobs = iter(enumerate(kinds))
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"repeated": [], "new": []}
    failures: list[str] = []
    stop = threading.Event()

    def worker(client: Client) -> None:
        while not stop.is_set():
            with lock:
                job = next(jobs, None)
            if job is None:
                return
            _, kind = job
            script = SCRIPT if kind == "repeated" else new_script()
            elapsed, result = run_client(client, spec, "-r", release, "-p4", "-e", script)
            with lock:
                if result.returncode == 0:
                    latencies[kind].append(elapsed)
                else:
                    failures.append(f"rc {result.returncode}: {result.stderr.strip()[-500:]}")

    clients = target.pool[:n_clients]
    sampler = RssSampler(target.pid) if target.pid else None
    if sampler:
        sampler.__enter__()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(n_clients) as executor:
            try:
                for future in [executor.submit(worker, client) for client in clients]:
                    future.result()
            except BaseException:
                stop.set()  # let the clients under way finish, start no more
                raise
    finally:
        elapsed = time.perf_counter() - started
        if sampler:
            sampler.__exit__()
    ok = len(latencies["repeated"]) + len(latencies["new"])
    return {
        "clients": n_clients, "requests": len(kinds), "ok": ok, "failures": failures,
        "elapsed_s": elapsed, "rps": ok / elapsed,
        "latency_s": latencies,
        "rss_samples_kb": sampler.samples if sampler else [],
    }


# --------------------------------------------------------------------------
# setup helpers


def stapsrv_help() -> str:
    """``twistd stap-server --help`` of the installed stapsrv (what the bench runs)."""
    try:
        result = subprocess.run(as_server_user([venv_bin("twistd"), "stap-server", "--help"]),
                                capture_output=True, text=True, cwd="/", timeout=120,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                     "HOME": test_user().pw_dir})
        return result.stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"warning: twistd stap-server --help failed ({exc}); options taken from tap.py")
        return (ROOT / "stapsrv" / "tap.py").read_text()


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    print(f"matplotlib is not importable: installing it into {sys.prefix} with pip, for the "
          f"plot only (it is not a stapsrv dependency) ...", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"])
    if result.returncode != 0:
        print("warning: pip could not install matplotlib; summary.png will not be written",
              flush=True)
        return False
    import importlib
    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def capture_response(client: Client, spec: str, release: str) -> bytes:
    """The server's response zip for SCRIPT, kept by the client's -k."""
    _, result = run_client(client, spec, "-r", release, "-p4", "-k", "-e", SCRIPT)
    match = _KEEPING.search(result.stderr)
    if result.returncode != 0 or match is None:
        raise BenchError(f"capturing the response failed (rc {result.returncode}):\n"
                         f"{result.stderr}")
    kept = Path(match.group(1))
    try:
        return (kept / "server.zip").read_bytes()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def start_replay(ssl_dir: Path, response: bytes) -> ServerProcess:
    base = scratch_directory("replay-")
    (base / "response.zip").write_bytes(response)
    user = test_user()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}
    server = ServerProcess("replay", [sys.executable, str(ROOT / "bench" / "replay.py"),
                                      "--ssl", str(ssl_dir), "--response",
                                      str(base / "response.zip"), "--log",
                                      str(base / "server.log")],
                           env, base, base / "server.log")
    server.wait_for_port(timeout=60)
    return server


def peer_runtime_args(peer: Peer, runtime_args: tuple[str, ...]) -> tuple[str, ...]:
    return runtime_args if peer.fixed_runtime else ()


def start_peer(peer: Peer, release: str, runtime_args: tuple[str, ...]) -> ServerProcess:
    for path in (peer.program, peer.translator):
        if not Path(path).exists():
            raise SystemExit(f"{peer.name}: {path} is not installed: run 'make setup'")
    server = start_stap_serverd(peer_runtime_args(peer, runtime_args), release,
                                program=peer.program, name=ENV_NAME[peer.name])
    server.name = peer.name  # both daemons' basename is stap-serverd
    return server


def served_release() -> tuple[str, list[str]]:
    """The release the benches build for (the newest installed build tree)
    and the server arguments naming its fixed runtime, if it needs one."""
    release = header_release()
    if release is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    runtime = fixed_runtime_for(release)
    return release, ["-R", runtime] if runtime else []


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rotate(items: list[Any], i: int) -> list[Any]:
    i %= len(items)
    return items[i:] + items[:i]


# --------------------------------------------------------------------------
# report


def summary_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ratio_text(value: float | None) -> str:
    return "—" if value is None or value < 0 else f"{value:.2f}×"


def build_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    m = data["measures"]
    rows: list[dict[str, Any]] = []

    def row(measure: str, values: dict[str, float], stapsrv: float | None,
            floor: float | None = None, target: str = "", met: bool | None = None,
            digits: int = 3) -> None:
        """``values`` holds (at least) each peer's value, by name."""
        peers = {name: values.get(name) for name in PEER_NAMES}
        ratios = {name: stapsrv / value if value and stapsrv is not None else None
                  for name, value in peers.items()}
        to_floor = stapsrv / floor if floor and stapsrv is not None else None
        rows.append({"measure": measure, "peers": peers, "stapsrv": stapsrv,
                     "ratios": ratios, "floor": floor, "to_floor": to_floor,
                     "target": target, "met": met, "digits": digits})

    # targets are defined against stap-serverd 4.8 (SERVERD)
    a = {name: s["median"] for name, s in m["repeated_p4"].items()}
    met = a[STAPSRV] <= 0.3 * a[SERVERD] and a[STAPSRV] <= 1.25 * a[FLOOR]
    row("(a) repeated `-p4`, median latency (s)", a, a[STAPSRV], a[FLOOR],
        "≤ 0.3× serverd 4.8 and ≤ 1.25× floor", met)
    b = {name: s["median"] for name, s in m["new_script"].items()}
    row("(b) new script, first request, median latency (s)", b, b[STAPSRV],
        target="≤ 1.0× serverd 4.8", met=b[STAPSRV] <= b[SERVERD])
    for key, batch in m["concurrent"].items():
        clients, mix = key.split("/")
        label = ("3/4 repeated + 1/4 new" if mix == "mixed" else "repeated only")
        values = {name: batch[name]["rps"] for name in batch}
        target, met = "", None
        if mix == "repeated" and clients == "16":
            target, met = "≥ 3× serverd 4.8", values[STAPSRV] >= 3 * values[SERVERD]
        requests = batch[STAPSRV]["requests"]
        row(f"(c) {clients} concurrent clients, {label}, {requests} requests: req/s",
            values, values[STAPSRV], values.get(FLOOR), target, met, digits=2)
    rss = m["rss"]
    idle = {name: r["idle_mb"] for name, r in rss.items()}
    row("(d) server RSS idle after warm-up (MB)", idle, idle[STAPSRV],
        target="stapsrv ≤ 60 MB", met=idle[STAPSRV] <= 60, digits=1)
    peak = {name: r["peak_mb"] for name, r in rss.items()}
    row("(d) server RSS peak during (c) (MB)", peak, peak[STAPSRV], digits=1)
    e = m["overhead"]
    translator = {name: o["translator_median"] for name, o in e.items()}
    row("(e) translator alone, warm, median (s); each server's own translator (5.5 for "
        "serverd 5.5)", translator, translator[STAPSRV])
    overhead = {name: o["overhead"] for name, o in e.items()}
    if STAPSRV_NC in e:
        row("(e) server overhead per request = (a) − translator (s); stapsrv column: a "
            "second stapsrv run with `--no-cache`", overhead, overhead[STAPSRV_NC], a[FLOOR])
    else:
        row("(e) server overhead per request = (a) − translator (s)", overhead,
            overhead[STAPSRV], a[FLOOR])
    return rows


def comparability(data: dict[str, Any]) -> str:
    """Which rows compare like with like against stap-serverd 5.5, with this run's facts."""
    m = data["measures"]
    e = m["overhead"]
    t48, t55 = e[SERVERD]["translator_median"], e[SERVERD55]["translator_median"]
    a48, a55 = e[SERVERD]["latency_median"], e[SERVERD55]["latency_median"]
    b48, b55 = m["new_script"][SERVERD]["median"], m["new_script"][SERVERD55]["median"]
    o48, o55 = e[SERVERD]["overhead"], e[SERVERD55]["overhead"]

    def than(x: float, y: float) -> str:
        """5.5's time against 4.8's."""
        if not y:
            return "—"
        return f"{x / y:.2f}× 4.8's time: " + ("slower" if x > y else "faster")

    return (
        f"Against {SERVERD55}: it runs another translator, 5.5 (`{CLIENT_55.stap}`, with its "
        "own tapsets and runtime and no `-R`), while stapsrv and stap-serverd 4.8 run the 4.8 "
        f"translator with the same fixed runtime; the client for every server is the 4.8 "
        f"`{STAP}`. Like with like: (a) repeated requests, (c) throughput and (d) memory, "
        "where the same client sends the same requests and what differs is the servers' own "
        "work (caching, TLS, unpacking and packing, processes). Not like with like: (b) "
        "new-script latency and the (e) translator and overhead rows, which compare a server "
        "*plus* a different translator. Two caveats: stap-serverd runs its translator for "
        "every request, a repeated one too (a translator cache hit), so its (a) and (c) "
        "figures include that warm run of its own translator; and the mixed (c) batches "
        "include new-script compiles, by each daemon's own translator. Observed in this run: "
        f"the 5.5 translator alone (warm, a cache hit) took {t55:.3f} s against 4.8's "
        f"{t48:.3f} s ({than(t55, t48)}); (a) through {SERVERD55} took {a55:.3f} s against "
        f"{a48:.3f} s through {SERVERD}, a difference of {a48 - a55:+.3f} s of which the "
        f"translators account for {t48 - t55:+.3f} s; a new script took {b55:.3f} s through "
        f"{SERVERD55} against {b48:.3f} s through {SERVERD} ({than(b55, b48)}); the daemon's "
        f"own overhead per repeated request ((a) − translator) was {o55:.3f} s for 5.5 "
        f"against {o48:.3f} s for 4.8.")


def render_markdown(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    info = data["info"]
    m = data["measures"]
    lines = [
        "# stapsrv vs stap-serverd 4.8 and 5.5",
        "",
        f"{info['date']}, kernel {info['release']}, runtime `{info['runtime']}`, "
        f"{info['cpus']} CPUs, {info['runs']} interleaved runs per latency measure "
        f"({info['new_runs']} for (b)), {info['requests_per_batch']} requests per (c) batch"
        f"{' (--quick)' if info['quick'] else ''}; stapsrv arguments: "
        f"`{' '.join(info['stapsrv_arguments']) or '(none)'}`"
        f"{'' if info['cache_dir_option'] else ' (no --cache-dir option in this stapsrv)'}; "
        f"load average before/after: {info['load_before']} / {info['load_after']}; "
        f"took {info['duration_s']:.0f} s. Client: the 4.8 `{STAP}` against every server.",
        "",
    ]
    columns = ["measure", *PEER_NAMES, STAPSRV, *(f"stapsrv / {p.short}" for p in PEERS),
               "floor", "stapsrv / floor", "target", "met"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        d = r["digits"]
        met = "" if r["met"] is None else ("**met**" if r["met"] else "not met")
        cells = [r["measure"], *(fmt(r["peers"][n], d) for n in PEER_NAMES),
                 fmt(r["stapsrv"], d), *(ratio_text(r["ratios"][n]) for n in PEER_NAMES),
                 fmt(r["floor"], d), ratio_text(r["to_floor"]), r["target"], met]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        comparability(data),
        "",
        "Floor: the same client against bench/replay.py, which answers every request with "
        "a response archive captured from stapsrv (no unpacking, no translator). For (c) it "
        "is measured on repeated-only batches. In the (e) overhead row the floor column is "
        "the client's own cost (floor latency), which every overhead includes. The "
        "translator alone is `stap -r REL -R RUNTIME -p4 -e SCRIPT` (for stap-serverd 5.5: "
        f"`{CLIENT_55.stap} -r REL -p4 -e SCRIPT`) run directly as the "
        "server user with the server's SYSTEMTAP_DIR/HOME/TMPDIR (a translator cache hit). "
        "stapsrv with its response cache never runs the translator for a repeated request, "
        "so its own latency-minus-translator is negative (see details). "
        "Latency: lower is better; req/s: higher is better.",
        "",
        "## Details (seconds unless noted)",
        "",
        "| measure | server | n | median | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for key, title in (("repeated_p4", "(a) repeated -p4"), ("new_script", "(b) new script")):
        for name, s in m[key].items():
            lines.append(f"| {title} | {name} | {s['n']} | {fmt(s['median'])} | "
                         f"{fmt(s['min'])} | {fmt(s['max'])} |")
    for name in MEASURED:
        o = m["overhead"][name]
        t = o["translator"]
        lines.append(f"| (e) translator alone | `{o['translator_program']}`, {ENV_NAME[name]} "
                     f"environment | {t['n']} | {fmt(t['median'])} | {fmt(t['min'])} | "
                     f"{fmt(t['max'])} |")
    lines += ["", "| (e) overhead | server | median latency (a) | translator median | "
              "overhead | overhead beyond the floor |", "|---|---|---|---|---|---|"]
    for name, s in m["overhead"].items():
        lines.append(f"| (e) | {name} | {fmt(s['latency_median'])} | "
                     f"{fmt(s['translator_median'])} | {fmt(s['overhead'])} | "
                     f"{fmt(s['overhead_beyond_floor'])} |")
    lines += ["", "| (c) batch | server | ok/requests | elapsed | req/s | median latency "
              "repeated | median latency new | failures |", "|---|---|---|---|---|---|---|---|"]
    for key, batch in m["concurrent"].items():
        for name, b in batch.items():
            lat = b["latency_s"]
            med = {k: statistics.median(v) if v else None for k, v in lat.items()}
            lines.append(f"| {key} | {name} | {b['ok']}/{b['requests']} | "
                         f"{b['elapsed_s']:.1f} | {b['rps']:.2f} | {fmt(med['repeated'])} | "
                         f"{fmt(med['new'])} | {len(b['failures'])} |")
    lines += ["", "| (d) memory | server | pid | idle (MB) | peak sampled during (c) (MB) | "
              "VmHWM at end (MB) | idle after (c) (MB) |", "|---|---|---|---|---|---|---|"]
    for name, r in m["rss"].items():
        lines.append(f"| RSS | {name} | {r['pid']} | {r['idle_mb']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['hwm_end_mb']:.1f} | {r['idle_after_mb']:.1f} |")
    failures = [(key, name, b["failures"][0]) for key, batch in m["concurrent"].items()
                for name, b in batch.items() if b["failures"]]
    if failures:
        lines += ["", "Failed requests (first of each batch):", ""]
        lines += [f"- {key} {name}: `{text.splitlines()[-1] if text else ''}`"
                  for key, name, text in failures]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = data["measures"]
    colors = {SERVERD: "tab:orange", SERVERD55: "tab:purple", STAPSRV: "tab:blue",
              STAPSRV_NC: "tab:cyan", FLOOR: "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    fig.suptitle(f"stapsrv vs stap-serverd 4.8 and 5.5 (4.8 client) — {data['info']['date']}, "
                 f"kernel {data['info']['release']}")

    ax = axes[0][0]
    groups = [("(a) repeated", m["raw"]["repeated_p4"]), ("(b) new script", m["raw"]["new_script"])]
    positions, values, labels, cols = [], [], [], []
    x = 0
    for title, raw in groups:
        for name, times in raw.items():
            positions.append(x)
            values.append(times)
            labels.append(title + "\n" + name.replace(" ", "\n", 1))
            cols.append(colors[name])
            x += 1
        x += 0.5
    box = ax.boxplot(values, positions=positions, widths=0.6, patch_artist=True)
    for patch, color in zip(box["boxes"], cols):
        patch.set_facecolor(color)
    ax.set_xticks(positions, labels, fontsize=7)
    ax.set_ylabel("client latency (s)")
    ax.set_yscale("log")
    ax.set_title("latency per request (log scale)")

    ax = axes[0][1]
    keys = list(m["concurrent"])
    bars = (*MEASURED, FLOOR)
    width = 0.8 / len(bars)
    for i, name in enumerate(bars):
        xs = [k + (i - (len(bars) - 1) / 2) * width for k in range(len(keys))]
        ys = [m["concurrent"][key].get(name, {}).get("rps", 0) for key in keys]
        ax.bar(xs, ys, width, label=name, color=colors[name])
    ax.set_xticks(range(len(keys)), [k.replace("/", " clients\n") for k in keys], fontsize=8)
    ax.set_ylabel("requests / s")
    ax.set_yscale("log")
    ax.set_title("(c) throughput, concurrent clients (log scale)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for name in MEASURED:
        offset, xs, ys = 0.0, [], []
        for key in keys:
            samples = m["concurrent"][key][name]["rss_samples_kb"]
            xs += [offset + t for t, _ in samples]
            ys += [mb(kb) for _, kb in samples]
            offset += m["concurrent"][key][name]["elapsed_s"]
        ax.plot(xs, ys, label=name, color=colors[name], linewidth=1,
                linestyle="-." if name == SERVERD55 else "-")  # it runs close to 4.8
        ax.axhline(m["rss"][name]["idle_mb"], color=colors[name], linestyle=":", linewidth=1)
    ax.axhline(60, color="red", linestyle="--", linewidth=1, label="60 MB target (stapsrv idle)")
    ax.set_xlabel("time in (c) batches, concatenated (s)")
    ax.set_ylabel("VmRSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("(d) server RSS during (c); dotted = idle after warm-up")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    names = [n for n in (*PEER_NAMES, STAPSRV_NC) if n in m["overhead"]]
    translator = [m["overhead"][n]["translator_median"] for n in names]
    overhead = [m["overhead"][n]["overhead"] for n in names]
    ticks = [f"{n}\n({'5.5' if n == SERVERD55 else '4.8'} translator)" for n in names]
    ax.bar(ticks, translator, color="tab:green", label="translator alone (warm)")
    ax.bar(ticks, overhead, bottom=translator, color=[colors[n] for n in names],
           label="server overhead = (a) − translator")
    ax.bar([f"{STAPSRV}\n(cache)", FLOOR],
           [m["repeated_p4"][STAPSRV]["median"], m["repeated_p4"][FLOOR]["median"]],
           color=[colors[STAPSRV], colors[FLOOR]], label="(a) latency")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("seconds (median)")
    ax.set_title("(e) where a repeated request's time goes (medians)")
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="interleaved runs per latency measure (default 15, --quick 3)")
    parser.add_argument("--new-runs", type=int, default=None,
                        help="runs of (b), each a full compile per server "
                        "(default 10, --quick 3)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per concurrent batch (default 48, --quick 32)")
    parser.add_argument("--quick", action="store_true",
                        help="few runs, small batches: to check the script end to end")
    parser.add_argument("--stapsrv-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for stapsrv (repeatable), "
                        "e.g. --stapsrv-arg=--no-cache")
    parser.add_argument("--no-plot", action="store_true", help="do not write summary.png")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' scratch directories (logs) and print them")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    options = parser.parse_args()
    runs = options.runs or (3 if options.quick else 15)
    new_runs = options.new_runs or (3 if options.quick else 10)
    requests = options.requests or (32 if options.quick else 48)
    levels = (8, 16)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    began = time.perf_counter()
    can_plot = not options.no_plot and ensure_matplotlib()
    release, runtime_list = served_release()
    runtime_args = tuple(runtime_list)
    runtime = runtime_list[1] if runtime_list else None
    load_before = load_average()

    homes: list[Path] = []
    scratch: list[Path] = []
    servers: list[ServerProcess] = []
    targets: dict[str, Target] = {}
    stapsrv_args = list(runtime_args)
    help_text = stapsrv_help()
    cache_option = "--cache-dir" in help_text
    no_cache_option = "--no-cache" in help_text and "--no-cache" not in options.stapsrv_arg
    try:
        if cache_option:
            cache_dir = scratch_directory("bench-cache-")
            scratch.append(cache_dir)
            stapsrv_args += ["--cache-dir", str(cache_dir)]
        stapsrv_args += options.stapsrv_arg
        peers = ", ".join(f"{p.name} ({'-R' if p.fixed_runtime else 'own runtime'})"
                          for p in PEERS)
        say(f"kernel {release}, runtime {runtime}; starting {peers} and stapsrv "
            f"({' '.join(stapsrv_args)}); client {STAP} for all")
        stapsrv = start_stapsrv(stapsrv_args, release, wait=False)
        servers.append(stapsrv)
        translator_48 = [STAP, "-r", release, *runtime_args]
        started = [(STAPSRV, stapsrv, translator_48)]
        if no_cache_option:
            nocache = start_stapsrv([*runtime_args, "--no-cache", *options.stapsrv_arg],
                                    release, wait=False)
            nocache.name = STAPSRV_NC
            servers.append(nocache)
            started.append((STAPSRV_NC, nocache, translator_48))
        for peer in PEERS:
            server = start_peer(peer, release, runtime_args)
            servers.append(server)
            started.append((peer.name, server, [peer.translator, "-r", release,
                                                *peer_runtime_args(peer, runtime_args)]))
        for name, server, _ in started:
            if name in (STAPSRV, STAPSRV_NC):
                server.wait_for_port()
        started.sort(key=lambda s: (*MEASURED, STAPSRV_NC).index(s[0]))
        for name, server, translator_argv in started:
            targets[name] = Target(name, server, make_client(homes), translator_argv)

        # ---- warm-up: trust, repeated script (fills caches), one new script,
        #      the concurrent clients' trust, the translator run directly
        for target in targets.values():
            say(f"warming {target.name} on {target.server.spec}")
            spec = target.server.spec
            trust(target.client, spec)
            for _ in range(2):
                timed_request(target.client, spec, release, SCRIPT)
            check_module(target.client, target.name)
            if target.name == STAPSRV_NC:
                continue  # only used for (e)
            timed_request(target.client, spec, release, new_script())
            for _ in range(max(levels)):
                client = make_client(homes)
                trust(client, spec)
                target.pool.append(client)
            translator_run(target, SCRIPT)
        say("capturing stapsrv's response for the replay floor")
        response = capture_response(targets[STAPSRV].client, stapsrv.spec, release)
        replay = start_replay(stapsrv.base / "ssl", response)
        servers.append(replay)
        scratch.append(replay.base)
        floor = Target(FLOOR, replay, make_client(homes), [])
        trust(floor.client, replay.spec)
        for _ in range(2):
            timed_request(floor.client, replay.spec, release, SCRIPT)
        check_module(floor.client, FLOOR)
        for _ in range(max(levels)):
            client = make_client(homes)
            trust(client, replay.spec)
            floor.pool.append(client)

        for peer in PEERS:
            targets[peer.name].pid = real_server_pid(targets[peer.name].server,
                                                     is_serverd(peer.program))
        targets[STAPSRV].pid = real_server_pid(stapsrv, is_stapsrv)
        pids = [targets[name].pid for name in MEASURED]
        if len(set(pids)) != len(pids):
            raise BenchError(f"server pids are not distinct: {pids}")
        time.sleep(1.0)
        idle_kb = {name: status_kb(targets[name].pid, "VmRSS") for name in MEASURED}
        say("idle RSS: " + ", ".join(f"{n} {mb(kb):.1f} MB" for n, kb in idle_kb.items()))

        everyone = [*targets.values(), floor]
        measured = [targets[name] for name in MEASURED]

        # ---- (a) repeated -p4, with the floor
        say(f"(a) repeated -p4, {runs} interleaved runs")
        repeated: dict[str, list[float]] = {t.name: [] for t in everyone}
        for i in range(runs):
            for t in rotate(everyone, i):
                repeated[t.name].append(timed_request(t.client, t.server.spec, release, SCRIPT))

        # ---- (e) the translator alone, warm
        say(f"(e) translator alone, {runs} interleaved runs")
        translator: dict[str, list[float]] = {t.name: [] for t in measured}
        for i in range(runs):
            for t in rotate(measured, i):
                translator[t.name].append(translator_run(t, SCRIPT))

        # ---- (b) first request of a new script
        say(f"(b) new script, {new_runs} interleaved runs")
        new: dict[str, list[float]] = {t.name: [] for t in measured}
        for i in range(new_runs):
            for t in rotate(measured, i):
                new[t.name].append(timed_request(t.client, t.server.spec, release, new_script()))

        # ---- (c) concurrent clients, with RSS sampling for (d)
        concurrent: dict[str, dict[str, Any]] = {}
        batches = [(level, mix) for level in levels for mix in ("mixed", "repeated")]
        for index, (level, mix) in enumerate(batches):
            key = f"{level}/{mix}"
            kinds = ["new" if mix == "mixed" and i % 4 == 3 else "repeated"
                     for i in range(requests)]
            random.Random(f"{key}").shuffle(kinds)
            order = rotate(measured, index)
            if mix == "repeated":
                order.append(floor)
            concurrent[key] = {}
            for t in order:
                say(f"(c) {level} clients, {mix}, {requests} requests: {t.name}")
                result = concurrent_batch(t, t.server.spec, release, level, kinds)
                concurrent[key][t.name] = result
                if result["failures"]:
                    say(f"    {len(result['failures'])} failed; first: "
                        f"{result['failures'][0]}")
                if result["ok"] < len(kinds) / 2:
                    raise BenchError(f"{t.name}: most requests failed in batch {key}")
                say(f"    {result['rps']:.2f} req/s in {result['elapsed_s']:.1f} s")
            concurrent[key] = {n: concurrent[key][n] for n in (*MEASURED, FLOOR)
                               if n in concurrent[key]}

        time.sleep(1.0)
        rss: dict[str, Any] = {}
        for name in MEASURED:
            t = targets[name]
            samples = [kb for key in concurrent
                       for _, kb in concurrent[key][name]["rss_samples_kb"]]
            rss[name] = {"pid": t.pid, "idle_kb": idle_kb[name], "idle_mb": mb(idle_kb[name]),
                         "peak_kb": max(samples), "peak_mb": mb(max(samples)),
                         "samples": len(samples),
                         "hwm_end_mb": mb(status_kb(t.pid, "VmHWM")),
                         "idle_after_mb": mb(status_kb(t.pid, "VmRSS"))}
        load_after = load_average()
        for server in servers:
            if server.exit_code is not None:
                raise BenchError(f"{server.name} exited early ({server.exit_code}):\n"
                                 f"{server.output()[-2000:]}")
    finally:
        for server in servers:
            server.stop()
        if options.keep:
            for server in servers:
                print(f"kept {server.name}: {server.base}", file=sys.stderr)
        else:
            for server in servers:
                shutil.rmtree(server.base, ignore_errors=True)
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)
        for path in homes:
            shutil.rmtree(path, ignore_errors=True)

    overhead = {}
    floor_median = statistics.median(repeated[FLOOR])
    for name in targets:
        source = STAPSRV if name == STAPSRV_NC else name  # the same translator and environment
        times = translator[source]
        tmed = statistics.median(times)
        latency = statistics.median(repeated[name])
        overhead[name] = {"translator": summary_stats(times), "translator_median": tmed,
                          "translator_program": targets[source].translator[0],
                          "latency_median": latency, "overhead": latency - tmed,
                          "overhead_beyond_floor": latency - tmed - floor_median}
    data: dict[str, Any] = {
        "info": {
            "date": time.strftime("%Y-%m-%d %H:%M"), "release": release, "runtime": runtime,
            "cpus": os.cpu_count(), "host": platform.node(), "runs": runs,
            "new_runs": new_runs,
            "requests_per_batch": requests, "levels": list(levels), "quick": options.quick,
            "stapsrv_arguments": stapsrv_args, "cache_dir_option": cache_option,
            "no_cache_instance": STAPSRV_NC in targets,
            "script": SCRIPT, "load_before": load_before, "load_after": load_after,
            "duration_s": time.perf_counter() - began,
        },
        "measures": {
            "repeated_p4": {n: summary_stats(v) for n, v in repeated.items()},
            "new_script": {n: summary_stats(v) for n, v in new.items()},
            "concurrent": concurrent,
            "rss": rss,
            "overhead": overhead,
            "raw": {"repeated_p4": repeated, "new_script": new, "translator": translator},
        },
    }
    rows = build_rows(data)
    data["summary"] = [{k: v for k, v in r.items() if k != "digits"} for r in rows]
    report = render_markdown(data, rows)
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "summary.md").write_text(report)
    update_summary(options.output)  # the rows of bench/soak.py and bench/haproxy.py
    print(report)
    if can_plot:
        try:
            plot(data, options.output / "summary.png")
            print(f"plot: {options.output / 'summary.png'}")
        except Exception as exc:  # the numbers are already written
            print(f"warning: plotting failed: {exc!r}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
    except KeyboardInterrupt as exc:
        print(f"benchmark interrupted ({exc or 'SIGINT'}); servers stopped, temp dirs removed",
              file=sys.stderr)
        sys.exit(130)
