"""What another suite's kernel costs its first client, and what a
toolchain costs a new script.

One stapsrv (the test user, loopback) on a fresh kernel store that holds
the forky toolchain (linked from the tests' store: ``make setup`` or the
system tests make it) and fetches from bookworm, trixie and forky through
its private apt.  The upstream 5.5 client asks for the newest trixie and
the newest forky release (both picked from the archive's lists now):
the first request (fetch, System.map, the forky toolchain's warm-up,
compile), the same request again (the response cache) and a new script;
then a new script for the installed bookworm release, by the host's
toolchain (4.8 client) and by forky's (5.5 client), each warmed first.

    .venv/bin/python bench/toolchains.py

Writes bench/results/toolchains.md and toolchains.json.  The fetches
depend on the network to deb.debian.org: the figures are one machine's,
one day's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import load_average, new_script, say  # noqa: E402
from stapsrv.kernel.toolchains import toolchains_directory  # noqa: E402
from tests.helpers import header_release  # noqa: E402
from tests.helpers.realserver import (  # noqa: E402
    CLIENT_48,
    CLIENT_55,
    Client,
    ClientKind,
    ServerProcess,
    owned_directory,
    scratch_directory,
    start_stapsrv,
)
from tests.helpers.toolchains import forky_store  # noqa: E402
from tests.system.test_suites import newest  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SUITES = ("bookworm", "bookworm-security", "trixie", "trixie-security", "trixie-updates",
          "forky")
#: The kernels asked for: (name, pattern of its releases, its suites).
KERNELS = (("trixie", r"\d+\.\d+\.\d+\+deb13(\.\d+)?-amd64",
            ("trixie", "trixie-security", "trixie-updates")),
           ("forky", r"\d+\.\d+\.\d+\+deb14(\.\d+)?-amd64", ("forky",)))
#: Steps of a first request, from the server's log.
STEPS = (("fetch", r"Fetched kernel {release} in ([0-9.]+) s"),
         ("System.map", r"Made the System.map of kernel {release} in ([0-9.]+) s"),
         ("warm-up", r"header for {release} with toolchain \S+ ready in ([0-9.]+) s"))


def request(client: Client, spec: str, release: str, script: str) -> float:
    """Seconds the client took for one ``-p4`` request; raises on failure."""
    started = time.perf_counter()
    done = subprocess.run([client.kind.stap, f"--use-server={spec}", "-r", release, "-p4",
                           "-e", script], env=client.env(), cwd=client.cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{client.kind.version} client failed for {release} "
                         f"(rc {done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def trusted_client(base: Path, kind: ClientKind, spec: str) -> Client:
    client = Client(base, kind)
    done = subprocess.run([kind.stap, f"--use-server={spec}", "--trust-servers=ssl,no-prompt"],
                          env=client.env(), cwd=client.cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"trusting the server failed:\n{done.stderr}")
    return client


def fresh_store(base: Path) -> Path:
    """An empty kernel store with the tests' forky toolchain in it."""
    store = owned_directory(base / "kernels")
    place = owned_directory(toolchains_directory(store))
    (place / "forky").symlink_to((toolchains_directory(forky_store()) / "forky").resolve())
    return store


def wait_for_lists(server: ServerProcess) -> None:
    for _ in range(600):
        if "Kernel store: fetching releases matching" in server.log():
            return
        time.sleep(1)
    raise SystemExit("the server's private apt never had its lists:\n" + server.log()[-3000:])


def measure(base: Path) -> dict[str, object]:
    installed = header_release()
    if installed is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    store = fresh_store(base)
    server = start_stapsrv(["--kernel-store", str(store), "--no-avahi", "--fetch-suites",
                            ",".join(SUITES)], installed)
    try:
        wait_for_lists(server)
        c55 = trusted_client(base / "c55", CLIENT_55, server.spec)
        c48 = trusted_client(base / "c48", CLIENT_48, server.spec)
        rows: dict[str, float] = {}
        steps: dict[str, dict[str, float]] = {}
        releases: dict[str, str] = {}
        for name, pattern, suites in KERNELS:
            release = newest(store, pattern, suites)
            releases[name] = release
            script = new_script()
            say(f"first request for {release} ({name})")
            rows[f"{name} {release}: first request"] = request(c55, server.spec, release,
                                                               script)
            rows[f"{name} {release}: same request again (cache)"] = request(
                c55, server.spec, release, script)
            rows[f"{name} {release}: new script"] = request(c55, server.spec, release,
                                                            new_script())
            log = server.log()
            steps[name] = {}
            for step, pattern_text in STEPS:
                found = re.search(pattern_text.format(release=re.escape(release)), log)
                if found:
                    steps[name][step] = float(found.group(1))
        for label, client in (("host's toolchain (4.8 client)", c48),
                              ("forky toolchain (5.5 client)", c55)):
            request(client, server.spec, installed, new_script())  # its warm-up
            rows[f"bookworm {installed}: new script, {label}"] = request(
                client, server.spec, installed, new_script())
        return {"installed": installed, "releases": releases, "rows": rows, "steps": steps}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    began, load_before = time.perf_counter(), load_average()
    base = scratch_directory("bench-toolchains-")
    try:
        data = measure(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    data.update(load_before=load_before, load_after=load_average(),
                duration_s=time.perf_counter() - began, date=time.strftime("%Y-%m-%d %H:%M"))
    rows = data["rows"]
    steps = data["steps"]
    assert isinstance(rows, dict) and isinstance(steps, dict)
    lines = ["# Other suites' kernels and the toolchains", "",
             f"{data['date']}, one run, fresh kernel store with the forky toolchain; load "
             f"average before/after: {load_before} / {data['load_after']}; took "
             f"{data['duration_s']:.0f} s.", "",
             "| request | seconds |", "|---|---|",
             *(f"| {name} | {value:.2f} |" for name, value in rows.items()), ""]
    for name, parts in steps.items():
        lines.append(f"Of the first {name} request (server log): "
                     + ", ".join(f"{step} {value:.1f} s" for step, value in parts.items())
                     + "; the rest is the compile itself.")
    lines.append("")
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "toolchains.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.output / "toolchains.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
