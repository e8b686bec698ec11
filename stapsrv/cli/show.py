"""How ``stap-server`` shows a server: its command line as 4.8 prints it,
its ``status --json`` record, and the lines ``status`` adds under it."""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
from pathlib import Path
from typing import Any

from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, proxied
from stapsrv.config.files import ServerSettings
from stapsrv.config.options import MANAGER_OPTIONS, SWITCH_NO
from stapsrv.core import counters as request_counters
from stapsrv.kernel import prepared
from stapsrv.vm import verification


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(settings: ServerSettings, nickname: bool = True) -> str:
    """A server as 4.8 prints it (``-a "x86_64" -u "srv" --log "..."``)."""
    s = settings
    words = [f"-a {_quote(s.arch)}"]
    words += [f"-r {_quote(r)}" for r in s.releases]
    if s.runtime:
        words.append(f"-R {_quote(s.runtime)}")
    words += [f"-D {_quote(d)}" for d in s.defines]
    words += [f"-I {_quote(i)}" for i in s.includes]
    words += [f"-B {_quote(b)}" for b in s.builds]
    words.append(f"-u {_quote(s.user)}")
    if nickname and s.nickname:
        words.append(f"-n {_quote(s.nickname)}")
    words.append(f"--log {_quote(s.log)}")
    for option in MANAGER_OPTIONS:
        assert option.variable is not None
        value = s.get(option.variable)
        if value and option.name != "log":
            # As shown: a fleet cache's URL without its password.
            words.append(f"--{option.name} {_quote(option.shown(value))}")
    return " ".join(words)


def status_record(settings: ServerSettings, pid: int | None, state: str,
                  counters: request_counters.Counters | None) -> dict[str, Any]:
    """One server in ``status --json``: what the status lines say, as values
    (``state``: running, stopped, dead; ``counters``: null when the server
    keeps none)."""
    s = settings
    return {
        "command": f"stap-server {render(s)}",
        "nickname": s.nickname or None,
        "pid": pid,
        "state": state,
        "user": s.user or None,
        "releases": list(s.releases),
        "port": int(s.port) if s.port.isdigit() else None,
        "endpoint": s.get("ENDPOINT") or None,
        "proxy_from": trusted_proxies(s),
        "metrics": s.get("METRICS") or None,
        "log": s.log or None,
        "sandbox": s.get("SANDBOX").lower() not in SWITCH_NO,
        "counters": None if counters is None else {
            name: getattr(counters, name) for name in request_counters.FIELDS},
        "verified": verified_releases(settings),
        "prepared": prepared_releases(settings),
    }


def server_store(settings: ServerSettings) -> Path | None:
    """The server's kernel store: KERNEL_STORE, else the default under its
    user's cache directory (``$XDG_CACHE_HOME`` only when we are that user)."""
    if settings.get("KERNEL_STORE"):
        return Path(settings.get("KERNEL_STORE"))
    try:
        user = pwd.getpwnam(settings.user) if settings.user else pwd.getpwuid(os.geteuid())
    except KeyError:
        return None
    cache = os.environ.get("XDG_CACHE_HOME") if os.geteuid() == user.pw_uid else None
    return Path(cache or Path(user.pw_dir) / ".cache") / "stapsrv" / "kernels"


def verified_releases(settings: ServerSettings) -> list[dict[str, Any]]:
    """What ``kernels verify`` found for the releases of the server's store."""
    store = server_store(settings)
    return [] if store is None else [found.as_json() for found in verification.load_all(store)]


def prepared_releases(settings: ServerSettings) -> list[dict[str, Any]]:
    """The releases the server prepared before clients asked (--prepare-releases)."""
    store = server_store(settings)
    return [] if store is None else [found.as_json() for found in prepared.load_all(store)]


def trusted_proxies(settings: ServerSettings) -> list[str] | None:
    """The networks a server believes PROXY headers from (its PROXY_FROM,
    else the default), or None when its endpoint reads no PROXY header."""
    endpoint = settings.get("ENDPOINT")
    if not (endpoint and proxied(endpoint)):
        return None
    words = [word for word in re.split(r"[\s,]+", settings.get("PROXY_FROM")) if word]
    return [_network_text(word) for word in words] or list(DEFAULT_PROXY_FROM)


def _network_text(word: str) -> str:
    """A network as the server logs it (``192.0.2.1/32``); what does not
    parse (the server refuses to start with it) as written."""
    try:
        return str(ipaddress.ip_network(word, strict=False))
    except ValueError:
        return word



def mode_line(settings: ServerSettings) -> str:
    """The line ``status`` prints about how the server runs translators (a
    server whose sandbox cannot run refuses to start, so the setting says
    what runs)."""
    if settings.get("SANDBOX").lower() in SWITCH_NO:
        return "  translators run without a sandbox (--sandbox no: 4.8's exposure)\n"
    return "  translators run in a bubblewrap sandbox\n"
