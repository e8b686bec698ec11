"""Telling systemd how the server is doing (the sd_notify protocol).

Under a ``Type=notify`` unit, systemd passes the path of a datagram socket
in ``$NOTIFY_SOCKET``; a service writes ``READY=1`` there once it serves,
``STOPPING=1`` when it begins to stop, and ``STATUS=...`` lines that
``systemctl status`` shows.  Outside systemd the variable is unset and
nothing is sent.  libsystemd is not needed: the protocol is one datagram.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger(namespace="stapsrv")


def socket_address(environ: Mapping[str, str]) -> str | None:
    """The notification socket's address for ``socket.sendto``, or None.

    A leading ``@`` names an abstract socket (a NUL byte on the wire)."""
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None


def message(**fields: str) -> bytes:
    """One notification: ``NAME=value`` lines (``ready="1"`` is ``READY=1``)."""
    lines = []
    for name, value in fields.items():
        if "\n" in value:
            raise ValueError(f"{name}: a notification value is one line")
        lines.append(f"{name.upper()}={value}")
    return "\n".join(lines).encode("utf-8")


def send(address: str, data: bytes) -> None:
    """Send one notification to ``address``; systemd going away is logged,
    never fatal."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, address)
    except OSError as exc:
        _log.warn("Cannot notify systemd ({address}): {error}",
                  address=address.replace("\0", "@"), error=exc.strerror)


class SystemdNotifier(Service):
    """Last child of the service tree: when it starts, every server before
    it listens, so it reports readiness; it reports stopping as the tree
    stops (the requests being compiled then get their answers)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.address = socket_address(environ)

    def startService(self) -> None:
        Service.startService(self)
        if self.address is not None:
            send(self.address, message(ready="1", status="Serving"))

    def stopService(self) -> None:
        Service.stopService(self)
        if self.address is not None:
            send(self.address, message(stopping="1",
                                       status="Stopping: finishing the requests in progress"))
