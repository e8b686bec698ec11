"""What scripts naming server paths cost a stapsrv (issue 16, items 1 and 3).

One stapsrv (the venv's: run ``make venv`` first), as the unprivileged test
user on loopback, cache on.  Raw requests (tests/helpers/rawclient.py):

  (a) ``-p2`` scripts whose text names ``/dev/zero``, ``/dev/urandom``,
      ``/sys/class/net`` and ``/proc/self``, two at a time, while a third
      client asks for an ordinary ``-p2`` script: seconds to each answer
      (cut at ``--limit``, then counted as no answer);
  (b) on a second server, ``--requests`` ``-p1`` requests, each naming a directory of its own
      (under ``/usr/share``, where the server user can read), then the server's
      VmRSS growth from before the first to after the last;
  (c) seconds from SIGTERM to the first server's exit, sent while two
      hostile requests are in flight.

Run as root:  .venv/bin/python bench/named_paths.py [--requests N]
Prints a JSON object; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import header_release  # noqa: E402
from tests.helpers.faults import wait_for_warm_up  # noqa: E402
from tests.helpers.rawclient import (  # noqa: E402
    basic_request,
    build_request,
    exchange,
    frame,
)
from tests.helpers.realserver import start_stapsrv  # noqa: E402

HOSTILE = ["/dev/zero", "/dev/urandom", "/sys/class/net", "/proc/self"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def directories(count: int) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, _ in os.walk("/usr/share"):
        dirnames.sort()
        found.append(dirpath)
        if len(found) >= count:
            break
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--limit", type=float, default=30.0)
    options = parser.parse_args()
    release = header_release()
    if release is None:
        raise SystemExit("no kernel headers installed: run 'make setup'")
    figures: dict[str, object] = {}
    servers = []

    def start() -> tuple[int, Callable[..., tuple[float, str]]]:
        server = start_stapsrv([], release)
        servers.append(server)
        wait_for_warm_up(server, release, timeout=600)
        cafile = server.base / "ssl" / "stap.cert"

        def ask(script: str, args: tuple[str, ...] = ("-p2",),
                limit: float = options.limit) -> tuple[float, str]:
            body = build_request(basic_request(script, release=release, args=args))
            started = time.monotonic()
            result = exchange(server.port, cafile, frame(body), timeout=limit)
            return round(time.monotonic() - started, 2), result.outcome
        return server.pid, ask  # setpriv execs twistd: this is the server

    try:
        pid, ask = start()
        figures["warm p2"] = ask('probe begin { println("warm") exit() }', limit=300)
        with ThreadPoolExecutor(8) as pool:
            hostile = {path: pool.submit(ask, f'probe begin {{ println("{path}") exit() }}')
                       for path in HOSTILE}
            time.sleep(1.0)
            other = pool.submit(ask, 'probe begin { println("other client") exit() }')
            figures["other client while hostile"] = other.result()
            figures["hostile"] = {path: future.result() for path, future in hostile.items()}
            again = [pool.submit(ask, f'probe begin {{ println("{path}") }} # again')
                     for path in HOSTILE[:2]]
            time.sleep(2.0)
            started = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            try:
                servers[0].process.wait(options.limit)
                figures["sigterm to exit s"] = round(time.monotonic() - started, 2)
            except subprocess.TimeoutExpired:
                figures["sigterm to exit s"] = f"> {options.limit}"
                servers[0].process.kill()
            for future in again:
                future.result()
        pid, ask = start()
        ask('probe begin { println("warm") }', ("-p1",), limit=300)
        named = directories(options.requests)
        before = rss_kib(pid)
        started = time.monotonic()
        timeouts = 0
        for index, path in enumerate(named):
            seconds, outcome = ask(f'probe begin {{ println("{path}") }}', ("-p1",))
            timeouts = timeouts + 1 if outcome != "answered" else 0
            if timeouts >= 3:
                figures["named: gave up after"] = f"{index + 1} requests (3 unanswered)"
                break
        figures["named directories"] = len(named)
        figures["named seconds"] = round(time.monotonic() - started, 1)
        figures["rss growth MiB"] = round((rss_kib(pid) - before) / 1024, 1)
    finally:
        for server in servers:
            if server.exit_code is None:
                server.process.kill()
                server.process.wait()
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
