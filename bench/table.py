"""The rows of the bench table (bench/results/summary.md) that come from the
benches run on their own: the soak (bench/soak.py), HAProxy's overhead
(bench/haproxy.py) and a hostile peer (bench/hostile.py).  bench/compare.py rewrites summary.md and calls
:func:`update_summary` so these rows stay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- fleet rows: bench/soak.py, bench/haproxy.py -->"
#: (The marker's text stays as it was: summary.md files written before
#: bench/hostile.py have it.)
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
    hostile = _load(results / "hostile.json")
    if hostile is not None:
        lines += _hostile_rows(hostile)
    return lines


def _hostile_rows(data: dict[str, Any]) -> list[str]:
    """One row per kind of request: its honest median in each hostile
    phase against the quiet one (all quiet phases pooled)."""
    phases, reference = data["phases"], data.get("quiet_reference")
    hostile = [name for name, phase in phases.items()
               if phase["phase"] != "quiet" and phase.get("ratios")]
    if reference is None or not hostile:
        return []
    rows = []
    for kind, label in (("hit", "repeated `-p4` (cache hit)"), ("new", "new script")):
        ratios = [phases[name]["ratios"][kind] for name in hostile]
        met = all(r is not None and r <= data["info"]["target"] for r in ratios)
        rows.append(
            f"| hostile peer: honest median, {label}, quiet → {' / '.join(hostile)} (s) | "
            f"{reference[kind]['median']:.3f} → "
            + " / ".join(f"{phases[name]['stats'][kind]['median']:.3f}" for name in hostile)
            + f" ({' / '.join('—' if r is None else f'{r:.2f}×' for r in ratios)}) | "
            f"≤ {data['info']['target']}× quiet | {'**met**' if met else 'not met'} | "
            f"{data['info']['date']} |")
    return rows


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
               "Measured by bench/soak.py (soak.md), bench/haproxy.py (haproxy.md) and "
               "bench/hostile.py (hostile.md), which run on their own.", "", *rows(results), "", END, ""]
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section))
