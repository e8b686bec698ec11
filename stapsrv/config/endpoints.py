"""Listener descriptions: Twisted server endpoint strings, checked.

The compile server listens where a Twisted endpoint description says
(``tcp:…``, ``haproxy:tcp:…`` for the PROXY protocol, ``systemd:…`` for a
socket handed over by socket activation); ``--listen``/``--port`` are a
shorthand for a ``tcp:`` description.  The server adds TLS itself, so only
the kinds that give a plain TCP stream are accepted here.
"""

from __future__ import annotations

from twisted.internet.endpoints import quoteStringArgument

#: Endpoint kinds that give a TCP stream, and the one wrapping another.
_STREAMS = ("tcp", "tcp6", "systemd")
_PROXY = "haproxy"

#: Where a PROXY protocol header is believed from when ``--proxy-from`` is
#: not given: this host only (an HAProxy beside the server).
DEFAULT_PROXY_FROM = ("127.0.0.0/8", "::1/128")


class EndpointError(ValueError):
    """An endpoint description the server cannot listen on."""


def shorthand(port: int, interface: str, backlog: int) -> str:
    """The ``tcp:`` description of ``--port``/``--listen`` and
    ``--listen-backlog`` (an ``--endpoint`` description sets its own
    ``backlog=``)."""
    quoted = quoteStringArgument(interface)  # type: ignore[no-untyped-call]
    return f"tcp:port={port}:interface={quoted}:backlog={backlog}"


def _kind(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def check(description: str, what: str = "--endpoint") -> str:
    """``description`` if the server can listen on it, else ``EndpointError``."""
    kind = _kind(description)
    inner = description.split(":", 1)[1] if ":" in description else ""
    if kind == _PROXY:
        kind = _kind(inner)
        if kind in _STREAMS:
            return description
        raise EndpointError(f"{what} {description!r}: haproxy: must wrap a tcp:, tcp6: "
                            "or systemd: endpoint")
    if kind in _STREAMS and inner:
        return description
    if kind in ("ssl", "tls"):
        raise EndpointError(f"{what} {description!r}: the server adds TLS itself; give "
                            "the tcp: endpoint under it")
    raise EndpointError(f"{what} {description!r} is not a tcp:, tcp6:, haproxy: or "
                        "systemd: endpoint description")


def proxied(description: str) -> bool:
    """Connections carry a PROXY protocol header with the client's address."""
    return _kind(description) == _PROXY
