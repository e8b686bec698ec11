"""Request counters: what one server has done since it started, and the
one-line text form ``stap-server status`` reads (``requests=N failures=N
cache_hits=N compiling=N waiting=N``)."""

from __future__ import annotations

import re

from attrs import define

FIELDS = ("requests", "failures", "cache_hits", "compiling", "waiting")
_LINE = re.compile(r"(\w+)=(\d+)")


@define
class Counters:
    """What one server has done since it started."""

    requests: int = 0
    failures: int = 0
    cache_hits: int = 0
    compiling: int = 0
    waiting: int = 0


def render(counters: Counters) -> str:
    return " ".join(f"{name}={getattr(counters, name)}" for name in FIELDS) + "\n"


def parse(text: str) -> Counters | None:
    """Counters from a file's text; None when it is not (yet) complete."""
    values = {name: int(value) for name, value in _LINE.findall(text)}
    if not text.endswith("\n") or set(values) != set(FIELDS):
        return None
    return Counters(**values)


def describe(counters: Counters) -> str:
    """The line ``stap-server status`` prints under a running server."""
    return (f"  requests {counters.requests}, failures {counters.failures}, "
            f"cache hits {counters.cache_hits}, compiling {counters.compiling}, "
            f"waiting {counters.waiting}\n")
