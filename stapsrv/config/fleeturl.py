"""The fleet cache's Redis URL: whether it can name a server, and how it
is shown (logs, status, terminals) without a password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a Redis server, or None when it can."""
    parts = urlsplit(url)
    shown = display_url(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return (f"the fleet cache {shown!r} is not a redis://HOST:PORT/DB, rediss:// or "
                f"unix:// URL")
    if parts.scheme != "unix" and not parts.hostname:
        return f"the fleet cache URL {shown!r} names no host"
    if parts.password is not None or "password=" in parts.query:
        return ("the fleet cache URL holds a password, which would show on command lines "
                "and in status files; put it in a file named by --fleet-password-file "
                "(FLEET_PASSWORD_FILE) or in $STAPSRV_FLEET_PASSWORD")
    return None


def display_url(url: str) -> str:
    """The URL with any password left out, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
