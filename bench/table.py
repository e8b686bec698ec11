"""The rows of the bench table (bench/results/summary.md) that come from the
benches run on their own: the soak (bench/soak.py) and HAProxy's overhead
(bench/haproxy.py).  bench/compare.py rewrites summary.md and calls
:func:`update_summary` so these rows stay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- fleet rows: bench/soak.py, bench/haproxy.py -->"
END = "<!-- end of fleet rows -->"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def rows(results: Path) -> list[str]:
    lines = ["| measure | value | target | met | run |", "|---|---|---|---|---|"]
    soak = _load(results / "soak.json")
    if soak is not None:
        first = soak["samples"][0] if soak["samples"] else soak["end"]
        growth = soak["rss_growth_mb"]
        lines += [
            f"| soak: RSS after {first['after']:.0f} → after {soak['end']['after']:.0f} "
            f"requests (MB) | {first['rss_mb']:.1f} → {soak['end']['rss_mb']:.1f} "
            f"({growth:+.1f}) | within {soak['rss_target_mb']:.0f} MB | "
            f"{'**met**' if abs(growth) <= soak['rss_target_mb'] else 'not met'} | "
            f"{soak['date']} |",
            f"| soak: open fds idle → 10 s after the end | {soak['idle']['fds']} → "
            f"{soak['settled']['fds']:.0f} | back to idle | "
            f"{'**met**' if soak['fds_back'] else 'not met'} | {soak['date']} |",
            f"| soak: threads idle → 10 s after the end | {soak['idle']['threads']} → "
            f"{soak['settled']['threads']:.0f} | back to idle | "
            f"{'**met**' if soak['threads_back'] else 'not met'} | {soak['date']} |",
            f"| soak: log errors beyond the {soak['counts']['hostile']} hostile connections; "
            f"client failures | {soak['log_error_count']}; {len(soak['client_failures'])} | "
            f"0 | {'**met**' if soak['log_error_count'] == 0 else 'not met'} | "
            f"{soak['date']} |",
        ]
    proxy = _load(results / "haproxy.json")
    if proxy is not None:
        added = proxy["added_ms"]
        lines.append(
            f"| HAProxy (PROXY protocol) in front: median repeated `-p4` direct → through "
            f"HAProxy (s) | {proxy['direct']:.3f} → {proxy['proxied']:.3f} "
            f"({added:+.1f} ms) | ≤ +{proxy['target_ms']:.0f} ms | "
            f"{'**met**' if added <= proxy['target_ms'] else 'not met'} | {proxy['date']} |")
    return lines


def update_summary(results: Path) -> None:
    """Put (or refresh) the rows at the end of summary.md."""
    path = results / "summary.md"
    try:
        text = path.read_text()
    except OSError:
        return
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head.rstrip("\n") + "\n" + tail.lstrip("\n")
    section = [BEGIN, "", "## Fleet and long-run rows", "",
               "Measured by bench/soak.py (soak.md) and bench/haproxy.py (haproxy.md), "
               "which run on their own.", "", *rows(results), "", END, ""]
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section))
