"""Advertising the server over mDNS, as stap-serverd 4.8 does through Avahi.

:mod:`stapsrv.app.records` computes what is published.  ``AvahiPublisher`` talks to
avahi-daemon over the D-Bus system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is
honoured); ``NullPublisher`` publishes nothing.  ``PublisherService`` is the
Twisted service that publishes once the listener knows its port.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stapsrv.app.avahibus import (
    AVAHI,
    COLLISION_ERROR,
    DBUS,
    DBUS_PATH,
    GROUP_COLLISION,
    GROUP_FAILURE,
    GROUP_INTERFACE,
    SERVER_COLLISION,
    SERVER_INTERFACE,
    SERVER_REGISTERING,
    SERVER_RUNNING,
    bus_error,
    remote_error_name,
    system_bus,
)
from stapsrv.app.interfaces import IServicePublisher, ServiceRecord
from stapsrv.app.records import SERVICE_TYPE, records_for
from stapsrv.app.service import CompileServerService
from stapsrv.reactor import IServerReactor

#: 4.8 gives up renaming after this many collisions.
MAX_COLLISIONS = 65535
#: Seconds between attempts to reach a system bus that is not there.
RETRY_INTERVAL = 5.0
#: Seconds shutdown waits for avahi-daemon to drop our services.
FREE_TIMEOUT = 5.0


@implementer(IServicePublisher)
class NullPublisher:
    """Publishes nothing (``--no-avahi``)."""

    published: tuple[str, ...] = ()

    def publish(self, records: Sequence[ServiceRecord]) -> None:
        pass

    def update(self, records: Sequence[ServiceRecord]) -> None:
        pass

    def withdraw(self) -> Deferred[None]:
        return succeed(None)


class _Abandoned(Exception):
    """The connection went away (shutdown or bus loss) during some work."""


@implementer(IServicePublisher)
class AvahiPublisher:
    """Publishes through avahi-daemon's D-Bus API, like 4.8's avahi-client.

    ``connect`` returns a Deferred connection to the system bus (txdbus's
    ``DBusClientConnection`` or a fake with the same few methods);
    ``clock`` schedules the retries while there is no bus at all.
    """

    def __init__(self, reactor: IServerReactor,
                 connect: Callable[[], Deferred[Any]] | None = None,
                 clock: IReactorTime | None = None, namespace: str = "stapsrv",
                 retry_interval: float = RETRY_INTERVAL) -> None:
        self.log = Logger(namespace=namespace, source=self)
        self._connect = connect or system_bus(reactor)
        self._clock = clock or reactor
        self._retry_interval = retry_interval
        self._records: tuple[ServiceRecord, ...] = ()
        self._connection: Any = None
        self._retry: IDelayedCall | None = None
        self._group: str | None = None
        self._name = ""
        self._published: tuple[str, ...] = ()
        self._collisions = 0
        self._warned = False
        self._stopped = True
        #: Bumped whenever the daemon or the bus goes away: work started for
        #: an older generation is abandoned.
        self._generation = 0
        self._lock = DeferredLock()

    @property
    def published(self) -> tuple[str, ...]:
        return self._published

    # -- IServicePublisher -------------------------------------------------

    def publish(self, records: Sequence[ServiceRecord]) -> None:
        self._records = tuple(records)
        self._stopped = False
        if self._records:
            self._name = self._records[0].name
        self._run(self._start())

    def update(self, records: Sequence[ServiceRecord]) -> None:
        if self._stopped:
            return
        self._records = tuple(records)
        # Without an entry group yet, registering will add the new records.
        self._run(self._republish())

    def withdraw(self) -> Deferred[None]:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return Deferred.fromCoroutine(self._withdraw())

    # -- connecting --------------------------------------------------------

    def _run(self, coroutine: Any) -> None:
        generation = self._generation

        def failed(failure: Failure) -> None:
            if failure.check(_Abandoned) or self._stopped or generation != self._generation:
                # The daemon, the bus or the server went away meanwhile.
                self.log.debug("Avahi work abandoned: {error}",
                               error=failure.getErrorMessage())
            else:
                self.log.failure("Avahi publishing failed", failure=failure)
        Deferred.fromCoroutine(coroutine).addErrback(failed)

    def _warn_once(self, message: str, **fields: Any) -> None:
        if not self._warned:
            self._warned = True
            self.log.warn(message, **fields)

    async def _start(self) -> None:
        self._retry = None
        if self._stopped:
            return
        try:
            connection = await self._connect()
        except Exception as exc:
            self._warn_once(
                "Failed to create Avahi client: {error}; Avahi service '{name}' will be "
                "established when the bus and the daemon are available",
                error=bus_error(exc), name=self._name)
            if not self._stopped:
                self._retry = self._clock.callLater(
                    self._retry_interval, lambda: self._run(self._start()))
            return
        if self._stopped:
            connection.disconnect()
            return
        self._connection = connection
        connection.notifyOnDisconnect(self._bus_lost)
        await connection.addMatch(self._owner_changed, mtype="signal", sender=DBUS,
                                  interface=DBUS, member="NameOwnerChanged",
                                  path=DBUS_PATH, arg=[(0, AVAHI)])
        await connection.addMatch(self._server_state_changed, mtype="signal",
                                  interface=SERVER_INTERFACE, member="StateChanged",
                                  path="/")
        await connection.addMatch(self._group_state_changed, mtype="signal",
                                  interface=GROUP_INTERFACE, member="StateChanged")
        owned = await connection.callRemote(
            DBUS_PATH, "NameHasOwner", interface=DBUS, destination=DBUS,
            signature="s", body=[AVAHI])
        if owned:
            await self._register_when_running()
        else:
            self._daemon_absent()

    def _daemon_absent(self) -> None:
        self._warn_once("The Avahi daemon is not running. Avahi service '{name}' will be "
                        "established when the daemon is started", name=self._name)

    def _bus_lost(self, connection: Any, reason: Failure) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        self._generation += 1
        self._forget_group()
        if self._stopped:
            return
        self.log.error("Avahi client failure: {error}", error="Daemon connection failed")
        self._warned = True
        self._run(self._start())

    # -- D-Bus signals -------------------------------------------------------

    def _owner_changed(self, message: Any) -> None:
        name, old, new = message.body
        if name != AVAHI or self._stopped:
            return
        if old:
            self._generation += 1
            if self._group is not None or self._published:
                self.log.error("Avahi client failure: {error}",
                               error="Daemon connection failed")
            self._forget_group()
        if new:
            self._run(self._register_when_running())

    def _server_state_changed(self, message: Any) -> None:
        state = message.body[0]
        if self._stopped:
            return
        if state == SERVER_RUNNING and self._group is None:
            self._run(self._register())
        elif state in (SERVER_REGISTERING, SERVER_COLLISION) and self._group is not None:
            # The host name is changing: drop our services (their SRV
            # records name the old host) and add them again once running.
            group = self._group
            self._generation += 1
            self._forget_group()
            self._run(self._free(group))

    async def _free(self, group: str) -> None:
        await self._entry_group(group, "Free")

    def _group_state_changed(self, message: Any) -> None:
        if message.path != self._group or self._stopped:
            return
        state, error = message.body[0], message.body[1]
        if state == GROUP_COLLISION:
            self._run(self._rename_and_republish())
        elif state == GROUP_FAILURE:
            self.log.error("Avahi entry group failure: {error}", error=error)

    # -- Avahi calls ---------------------------------------------------------

    def _server(self, method: str, signature: str | None = None,
                body: list[Any] | None = None) -> Deferred[Any]:
        if self._connection is None:
            raise _Abandoned(method)
        answer: Deferred[Any] = self._connection.callRemote(
            "/", method, interface=SERVER_INTERFACE, destination=AVAHI,
            signature=signature, body=body)
        return answer

    def _entry_group(self, path: str, method: str, signature: str | None = None,
                     body: list[Any] | None = None) -> Deferred[Any]:
        if self._connection is None:
            raise _Abandoned(method)
        answer: Deferred[Any] = self._connection.callRemote(
            path, method, interface=GROUP_INTERFACE, destination=AVAHI,
            signature=signature, body=body)
        return answer

    async def _register_when_running(self) -> None:
        if self._connection is None:
            return
        state = await self._server("GetState")
        if state == SERVER_RUNNING:
            await self._register()
        # Otherwise the Server's StateChanged(RUNNING) signal registers.

    async def _register(self) -> None:
        """Create the entry group and add every record (4.8: create_services)."""
        await self._lock.acquire()
        try:
            if self._group is not None or self._connection is None or self._stopped:
                return
            generation = self._generation
            if self._records:
                self._name = self._records[0].name
            path = await self._server("EntryGroupNew")
            if generation != self._generation:
                return
            self._group = path
            await self._add_services(generation)
        finally:
            self._lock.release()

    async def _rename_and_republish(self) -> None:
        await self._lock.acquire()
        try:
            if self._group is None or self._connection is None:
                return
            generation = self._generation
            if not await self._rename(generation):
                return
            await self._entry_group(self._group, "Reset")
            await self._add_services(generation)
        finally:
            self._lock.release()

    async def _republish(self) -> None:
        await self._lock.acquire()
        try:
            if self._group is None or self._connection is None or self._stopped:
                return
            generation = self._generation
            await self._entry_group(self._group, "Reset")
            self._published = ()
            await self._add_services(generation)
        finally:
            self._lock.release()

    async def _rename(self, generation: int) -> bool:
        self._collisions += 1
        if self._collisions >= MAX_COLLISIONS:
            self.log.error("Too many service name collisions for Avahi service {type}",
                           type=SERVICE_TYPE)
            return False
        new = await self._server("GetAlternativeServiceName", "s", [self._name])
        if generation != self._generation:
            return False
        self.log.warn("Avahi service name collision, renaming service '{old}' to '{new}'",
                      old=self._name, new=new)
        self._name = new
        return True

    async def _add_services(self, generation: int) -> None:
        group = self._group
        assert group is not None
        self.log.info("Adding Avahi service '{name}'", name=self._name)
        names = []
        for record in self._records:
            while True:
                try:
                    await self._entry_group(group, "AddService", "iiussssqaay", [
                        -1, -1, 0, self._name, SERVICE_TYPE, "", "", record.port,
                        [bytearray(t) for t in record.txt]])
                except Exception:
                    failure = Failure()
                    if (failure.check(_Abandoned) or self._stopped
                            or generation != self._generation):
                        failure.raiseException()
                    if remote_error_name(failure) != COLLISION_ERROR:
                        self.log.error("Failed to add {type} service: {error}",
                                       type=SERVICE_TYPE, error=failure.getErrorMessage())
                        await self._entry_group(group, "Reset")
                        return
                    if not await self._rename(generation):
                        return
                    continue
                if generation != self._generation:
                    return
                names.append(self._name)
                break
        await self._entry_group(group, "Commit")
        self._published = tuple(names)
        self._warned = False

    def _forget_group(self) -> None:
        self._group = None
        self._published = ()

    async def _withdraw(self) -> None:
        connection, group = self._connection, self._group
        self._connection = None
        self._forget_group()
        if connection is None:
            return
        if group is not None:
            self.log.info("Removing Avahi service '{name}'", name=self._name)
            try:
                await connection.callRemote(group, "Free", interface=GROUP_INTERFACE,
                                            destination=AVAHI, timeout=FREE_TIMEOUT)
            except Exception as exc:
                self.log.debug("Freeing the Avahi entry group failed: {error}", error=exc)
        connection.disconnect()


class PublisherService(Service):
    """Publishes a server's records while running; started after the listener.

    ``records`` is called at start, when the port and certificate are known.
    """

    def __init__(self, publisher: IServicePublisher,
                 records: Callable[[], Sequence[ServiceRecord]]) -> None:
        self.publisher = publisher
        self.records = records

    def startService(self) -> None:
        Service.startService(self)
        self.publisher.publish(self.records())

    def refresh(self) -> None:
        """The server's releases changed: advertise its records anew."""
        if self.running:
            self.publisher.update(self.records())

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.publisher.withdraw()


def publisher_service(server: CompileServerService, reactor: IServerReactor,
                      enabled: bool = True) -> PublisherService:
    """A ``PublisherService`` for ``server`` (Avahi, or nothing)."""
    publisher: IServicePublisher
    if enabled:
        publisher = AvahiPublisher(reactor, namespace=server.config.log_namespace)
    else:
        publisher = NullPublisher()
    service = PublisherService(publisher, records_for(server))
    server.on_releases_changed.append(service.refresh)
    return service
