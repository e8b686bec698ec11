"""avahi-daemon's D-Bus names and states, and the system bus: how to reach
it and how its failures read in the log."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from txdbus import client

from stapsrv.reactor import IServerReactor

AVAHI = "org.freedesktop.Avahi"
SERVER_INTERFACE = "org.freedesktop.Avahi.Server"
GROUP_INTERFACE = "org.freedesktop.Avahi.EntryGroup"
COLLISION_ERROR = "org.freedesktop.Avahi.CollisionError"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
#: libdbus's (and txdbus's) system bus without DBUS_SYSTEM_BUS_ADDRESS.
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"

#: Avahi server and entry group states.
SERVER_REGISTERING = 1
SERVER_RUNNING = 2
SERVER_COLLISION = 3
GROUP_COLLISION = 3
GROUP_FAILURE = 4


def system_bus(reactor: IServerReactor) -> Callable[[], Deferred[Any]]:
    def connect() -> Deferred[Any]:
        # txdbus is untyped: its connection is Any here.
        connection: Deferred[Any] = client.connect(reactor, "system")
        return connection
    return connect


def remote_error_name(failure: Failure) -> str | None:
    return getattr(failure.value, "errName", None)


def bus_error(exc: Exception) -> str:
    if isinstance(exc, ConnectError):
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)
        return f"cannot connect to the D-Bus system bus at {address}"
    return str(exc) or type(exc).__name__
