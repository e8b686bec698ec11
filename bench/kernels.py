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

``--prepare`` measures issue 29's preparation instead (kernels-prepare.md
and .json): a server with ``--prepare-releases`` and the bookworm suites,
whose fresh store's lists show the release at its first update (its
appearance), makes it ready without any client (time to ready, with each
step); its first request for it, then a second fleet member's (same Redis,
same store path, its own configuration header store) and an unprepared
server's first request for the same release.
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
    parser.add_argument("--prepare", action="store_true",
                        help="measure --prepare-releases and the fleet's shared header")
    options = parser.parse_args()
    if options.prepare:
        return bench_prepare(options.output)
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


SUITES = "bookworm,bookworm-updates,bookworm-security"


def wait_for(server: ServerProcess, pattern: str, net: float = 3600.0) -> re.Match[str]:
    """The first match of ``pattern`` in the server's log, once there (a
    net for a run gone wrong, not a measure)."""
    deadline = time.monotonic() + net
    while True:
        found = re.search(pattern, server.log())
        if found is not None:
            return found
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise SystemExit(f"no {pattern!r} in the log of {server.spec}:\n"
                             + server.log()[-3000:])
        time.sleep(0.5)


def bench_prepare(output: Path) -> int:
    from stapsrv.config.secret import create_secret
    from tests.helpers.realredis import RedisServer
    from tests.helpers.realserver import test_user

    installed = header_release()
    release = older_abi_release()
    began, load_before = time.perf_counter(), load_average()
    base = scratch_directory("bench-prepare-")
    redis = RedisServer(base / "redis").start()
    user = test_user()
    secret = base / "fleet.secret"
    create_secret(secret, owner=(user.pw_uid, user.pw_gid))
    store = owned_directory(base / "store")
    # The fleet's members run one fixed runtime, at one path (as the same
    # package and user give every host; here each server has a cache
    # directory of its own, so it is named with -R).
    from stapsrv.kernel.runtime import select_runtime
    from stapsrv.paths import build_tree
    fixed = select_runtime(build_tree(installed or release),
                           cache_root=owned_directory(base / "runtime"))
    common = ["--kernel-store", str(store), "--fetch-suites", SUITES, "--fetch-releases",
              release, "--fleet-cache", redis.url, "--fleet-secret", str(secret),
              *(["-R", str(fixed)] if fixed is not None else [])]
    homes: list[Path] = []
    servers: list[ServerProcess] = []
    data: dict[str, object] = {"release": release, "installed": installed, "suites": SUITES}
    try:
        say(f"server A prepares {release} (its lists show it at its first update)")
        a = start_stapsrv([*common, "--prepare-releases"], installed,
                          env={"XDG_CACHE_HOME": str(owned_directory(base / "xdg-a"))})
        servers.append(a)
        ready = wait_for(a, rf"Kernel {re.escape(release)} is ready: ready ([0-9.]+) s after "
                            r"it appeared in the lists \(([^)]*)\)|"
                            rf"Kernel {re.escape(release)} not prepared: (.*)")
        if ready.group(3):
            raise SystemExit(f"not prepared: {ready.group(3)}")
        data["appearance_to_ready_s"] = float(ready.group(1))
        data["steps"] = {name: float(seconds) for name, seconds in re.findall(
            r"([a-z][a-z0-9 ]*?) ([0-9.]+) s", ready.group(2))}
        data["A shared the header"] = (f"Kernel configuration header for {release} shared "
                                       "through the fleet cache" in a.log())
        client = make_client(homes)
        trust(client, a.spec)
        data["first request, prepared release (A)"] = timed_request(
            client, a.spec, release, new_script())
        say(f"server B, a second member of the fleet: its first request for {release}")
        b = start_stapsrv(common, installed,
                          env={"XDG_CACHE_HOME": str(owned_directory(base / "xdg-b"))})
        servers.append(b)
        trust(client, b.spec)
        data["first request, second fleet member (B)"] = timed_request(
            client, b.spec, release, new_script())
        log_b = b.log()
        data["B took the header from the fleet"] = (
            f"Kernel configuration header for {release} ready from the fleet cache" in log_b)
        data["B warmed up itself"] = (
            f"Kernel configuration header for {release} ready in" in log_b)
        data["log B"] = [line for line in log_b.splitlines()
                         if release in line or "header" in line or "Running" in line][-40:]
        say(f"server C, unprepared: its first request for {release}")
        c_store = owned_directory(base / "store-c")
        c = start_stapsrv(["--kernel-store", str(c_store), "--fetch-suites", SUITES,
                           "--fetch-releases", release], installed,
                          env={"XDG_CACHE_HOME": str(owned_directory(base / "xdg-c"))})
        servers.append(c)
        trust(client, c.spec)
        data["first request, unprepared release (C)"] = timed_request(
            client, c.spec, release, new_script())
        data["new script, installed release (C)"] = timed_request(
            client, c.spec, installed or release, new_script())
    finally:
        for server in servers:
            server.stop()
        redis.stop()
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    data |= {"load_before": load_before, "load_after": load_average(),
             "duration_s": time.perf_counter() - began,
             "date": time.strftime("%Y-%m-%d %H:%M")}
    steps = data["steps"]
    assert isinstance(steps, dict)
    rows = [name for name in data if name.startswith(("first request", "new script"))]
    lines = [
        "# A new release prepared before any client asks (--prepare-releases)", "",
        f"{data['date']}, release {release} from {SUITES}, one run, real 4.8 client, load "
        f"average before/after: {load_before} / {data['load_after']} (the machine was "
        f"shared with other work: loaded), took {data['duration_s']:.0f} s.", "",
        f"Server A, with a fresh store, saw {release} at its first update of the lists and "
        f"made it ready {data['appearance_to_ready_s']:.1f} s later without any client: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items()) + ".", "",
        "| request | seconds |", "|---|---|",
        *(f"| {name} | {data[name]:.2f} |" for name in rows), "",
        f"A shared the header through the fleet cache: {data['A shared the header']}.  "
        f"B (same Redis, same store path, a configuration header store of its own) took "
        f"the header from the fleet cache: {data['B took the header from the fleet']}; "
        f"warmed up itself: {data['B warmed up itself']}.  B shares A's store directory on "
        "this one machine, so its first request fetched nothing; on another host it "
        "would fetch the release first (A's fetch step above).", "",
    ]
    output.mkdir(parents=True, exist_ok=True)
    (output / "kernels-prepare.json").write_text(json.dumps(data, indent=1) + "\n")
    (output / "kernels-prepare.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
