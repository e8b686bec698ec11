"""Time the real stap client against stapsrv and stap-serverd 4.8, side by side.

Both servers run as the unprivileged test user on loopback with the same
kernel release and the same runtime (-R), are warmed, and then get
interleaved runs (A, B, A, B, ...) of the same repeated -p4 request, so
that machine noise hits both alike.  Run after `make setup`, as root:

    .venv/bin/python bench/compare.py [--runs N]

Prints a markdown table and writes it to bench/results/repeated-p4.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.realserver import (  # noqa: E402
    STAP,
    fixed_runtime_for,
    newest_header_release,
    start_stap_serverd,
    start_stapsrv,
)

SCRIPT = 'probe begin { println("bench"); exit() }'


def client(server_spec: str, release: str, home: Path, *args: str) -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "SYSTEMTAP_DIR": str(home / "systemtap"), "LANG": "C.UTF-8"}
    started = time.perf_counter()
    result = subprocess.run([STAP, f"--use-server={server_spec}", *args], env=env, cwd=home,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"client failed against {server_spec}:\n{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    release = newest_header_release()
    if release is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    runtime = fixed_runtime_for(release)
    arguments = ("-R", runtime) if runtime else ()
    servers = {"stap-serverd 4.8": start_stap_serverd(arguments, release),
               "stapsrv": start_stapsrv(arguments, release)}
    times: dict[str, list[float]] = {name: [] for name in servers}
    homes: dict[str, Path] = {}
    try:
        for name, server in servers.items():
            home = Path(tempfile.mkdtemp(prefix="bench-client-"))
            homes[name] = home
            client(server.spec, release, home, "--trust-servers=ssl,no-prompt")
            for _ in range(2):  # warm: translator cache, autoconf, page cache
                client(server.spec, release, home, "-r", release, "-p4", "-e", SCRIPT)
        for _ in range(options.runs):
            for name, server in servers.items():
                times[name].append(client(server.spec, release, homes[name],
                                          "-r", release, "-p4", "-e", SCRIPT))
    finally:
        for server in servers.values():
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["stapsrv"] / medians["stap-serverd 4.8"]
    lines = [
        f"Repeated `-p4` request, real client, {options.runs} interleaved runs each, "
        f"kernel {release}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| server | median (s) | min (s) | max (s) |",
        "|---|---|---|---|",
        *[f"| {name} | {medians[name]:.3f} | {min(v):.3f} | {max(v):.3f} |"
          for name, v in times.items()],
        "",
        f"stapsrv / stap-serverd = {ratio:.2f}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "repeated-p4.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
