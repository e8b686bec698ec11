"""Avahi publishing: the records, the publisher against a fake bus, and the
real thing (a private dbus-daemon + avahi-daemon, avahi-browse, real stap)."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.trial.unittest import TestCase
from txdbus.error import RemoteError
from zope.interface import implementer
from zope.interface.verify import verifyObject

from stapsrv.app import publish, records
from stapsrv.app.accepts import AcceptErrorLog
from stapsrv.app.avahibus import AVAHI, COLLISION_ERROR
from stapsrv.app.interfaces import IServicePublisher
from stapsrv.app.publish import AvahiPublisher, NullPublisher, PublisherService
from stapsrv.app.records import service_records

BASE = "Systemtap Compile Server on vm"


class FakeMessage:
    def __init__(self, path: str, body: list[Any]) -> None:
        self.path = path
        self.body = body


class FakeBus:
    """The few txdbus connection methods the publisher uses, with a tiny
    Avahi behind them (names collide across every group, like Avahi)."""

    def __init__(self, avahi: bool = True, state: int = 2) -> None:
        self.avahi = avahi
        self.state = state
        self.matches: list[tuple[Callable[[FakeMessage], None], dict[str, Any]]] = []
        self.calls: list[tuple[str, str, list[Any]]] = []
        self.groups: dict[str, list[tuple[str, list[bytes]]]] = {}
        self.committed: set[str] = set()
        self.foreign: set[str] = set()
        self.lost: list[Callable[[Any, Any], None]] = []
        self.disconnected = False
        self._count = 0
        #: While set, AddService calls wait for it (a slow daemon).
        self.hold: Deferred[None] | None = None

    def addMatch(self, callback: Callable[[FakeMessage], None], **rule: Any) -> Deferred[int]:
        self.matches.append((callback, rule))
        return succeed(len(self.matches))

    def notifyOnDisconnect(self, callback: Callable[[Any, Any], None]) -> None:
        self.lost.append(callback)

    def disconnect(self) -> None:
        self.disconnected = True

    def emit(self, interface: str, member: str, path: str, body: list[Any]) -> None:
        for callback, rule in list(self.matches):
            if (rule.get("interface") == interface and rule.get("member") == member
                    and rule.get("path", path) == path):
                callback(FakeMessage(path, body))

    def names(self) -> list[str]:
        return [name for entries in self.groups.values() for name, _ in entries]

    def callRemote(self, path: str, method: str, interface: str | None = None,
                   destination: str | None = None, signature: str | None = None,
                   body: list[Any] | None = None, timeout: float | None = None) -> Deferred[Any]:
        body = body or []
        self.calls.append((path, method, body))
        if method == "NameHasOwner":
            return succeed(self.avahi)
        if not self.avahi:
            return fail(RemoteError("org.freedesktop.DBus.Error.ServiceUnknown"))
        if method == "GetState":
            return succeed(self.state)
        if method == "EntryGroupNew":
            self._count += 1
            group = f"/Client1/EntryGroup{self._count}"
            self.groups[group] = []
            return succeed(group)
        if method == "GetAlternativeServiceName":
            match = re.fullmatch(r"(.*) #(\d+)", body[0])
            if match:
                return succeed(f"{match.group(1)} #{int(match.group(2)) + 1}")
            return succeed(body[0] + " #2")
        if method == "AddService" and self.hold is not None:
            held, self.hold = self.hold, None
            return held.addCallback(lambda _: self.callRemote(path, method, interface,
                                                              destination, signature, body))
        if method == "AddService":
            name, txt = body[3], body[8]
            assert all(isinstance(t, bytearray) for t in txt), "aay needs bytearrays"
            if name in self.names() or name in self.foreign:
                return fail(RemoteError(COLLISION_ERROR))
            self.groups[path].append((name, [bytes(t) for t in txt]))
            return succeed(None)
        if method == "Commit":
            self.committed.add(path)
            return succeed(None)
        if method in ("Reset", "Free"):
            self.groups[path] = []
            self.committed.discard(path)
            if method == "Free":
                del self.groups[path]
            return succeed(None)
        raise AssertionError(f"unexpected call {method}")

    def owner_changed(self, old: str, new: str) -> None:
        self.emit("org.freedesktop.DBus", "NameOwnerChanged", "/org/freedesktop/DBus",
                  [AVAHI, old, new])


RECORDS = service_records("vm", ["6.1.0-56-amd64", "6.18.44"], "x86_64", [], 47001, "0a:0b")


class PublisherTests(TestCase):
    def make(self, *buses: FakeBus | Exception) -> tuple[AvahiPublisher, list[str], Clock]:
        pending = list(buses)

        def connect() -> Deferred[Any]:
            bus = pending.pop(0) if len(pending) > 1 else pending[0]
            if isinstance(bus, Exception):
                return fail(bus)
            return succeed(bus)

        clock = Clock()
        lines: list[str] = []
        publisher = AvahiPublisher(clock, connect=connect, clock=clock)

        def observe(event: LogEvent) -> None:
            lines.append(formatEvent(event))
        publisher.log = Logger(namespace="stapsrv", observer=observe)
        return publisher, lines, clock

    def test_interfaces(self) -> None:
        verifyObject(IServicePublisher, NullPublisher())
        verifyObject(IServicePublisher, self.make(FakeBus())[0])

    def test_publishes_each_release_renaming_the_second(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        [(group, entries)] = bus.groups.items()
        self.assertEqual(entries, [(BASE, list(RECORDS[0].txt)), (BASE + " #2", list(RECORDS[1].txt))])
        self.assertIn(group, bus.committed)
        self.assertEqual(publisher.published, (BASE, BASE + " #2"))
        self.assertEqual(lines, [
            f"Adding Avahi service '{BASE}'",
            f"Avahi service name collision, renaming service '{BASE}' to '{BASE} #2'"])
        add = [body for _, method, body in bus.calls if method == "AddService"][0]
        self.assertEqual(add[:8], [-1, -1, 0, BASE, "_stap._tcp", "", "", 47001])

    def test_update_replaces_the_records(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS[:1])
        [group] = bus.groups
        self.assertEqual([name for name, _ in bus.groups[group]], [BASE])
        publisher.update(RECORDS)
        self.assertEqual(bus.groups[group], [(BASE, list(RECORDS[0].txt)),
                                             (BASE + " #2", list(RECORDS[1].txt))])
        self.assertIn(group, bus.committed)
        self.assertEqual(publisher.published, (BASE, BASE + " #2"))
        # Once withdrawn, an update publishes nothing.
        self.successResultOf(publisher.withdraw())
        publisher.update(RECORDS[:1])
        self.assertEqual(bus.groups, {})

    def test_update_before_the_daemon_answers_is_what_gets_published(self) -> None:
        bus = FakeBus()
        bus.state = 1  # avahi-daemon still starting
        publisher, _, _ = self.make(bus)
        publisher.publish(RECORDS[:1])
        publisher.update(RECORDS)
        self.assertEqual(bus.groups, {})
        bus.state = 2
        bus.emit("org.freedesktop.Avahi.Server", "StateChanged", "/", [2, ""])
        self.assertEqual(bus.names(), [BASE, BASE + " #2"])

    def test_refresh_publishes_the_records_of_now(self) -> None:
        published: list[list[str]] = []

        @implementer(IServicePublisher)
        class Recording(NullPublisher):
            def publish(self, records: Any) -> None:
                published.append(["publish", *(r.txt[0] for r in records)])

            def update(self, records: Any) -> None:
                published.append(["update", *(r.txt[0] for r in records)])

        releases = ["6.1.0-57-amd64"]
        service = PublisherService(Recording(), lambda: service_records(
            "vm", releases, "x86_64", [], 47001, "0a:0b"))
        service.refresh()  # not running: nothing
        service.startService()
        releases.append("6.1.0-55-amd64")
        service.refresh()
        self.assertEqual([[entry[0], len(entry) - 1] for entry in published],
                         [["publish", 1], ["update", 2]])

    def test_local_collision_with_another_server(self) -> None:
        bus = FakeBus()
        bus.foreign = {BASE, BASE + " #2"}
        publisher, _, _ = self.make(bus)
        publisher.publish(RECORDS)
        self.assertEqual(publisher.published, (BASE + " #3", BASE + " #4"))

    def test_remote_collision_renames_and_republishes(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        [group] = bus.groups
        del lines[:]
        bus.emit("org.freedesktop.Avahi.EntryGroup", "StateChanged", "/other", [3, ""])
        self.assertEqual(lines, [])
        bus.emit("org.freedesktop.Avahi.EntryGroup", "StateChanged", group, [3, ""])
        self.assertEqual([n for n, _ in bus.groups[group]], [BASE + " #3", BASE + " #4"])
        self.assertIn(group, bus.committed)
        self.assertEqual(lines[0], f"Avahi service name collision, renaming service "
                                   f"'{BASE} #2' to '{BASE} #3'")
        self.assertIn(f"Adding Avahi service '{BASE} #3'", lines)

    def test_daemon_restart_republishes(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        bus.groups.clear()
        bus.owner_changed(":1.4", "")
        self.assertEqual(publisher.published, ())
        self.assertIn("Avahi client failure: Daemon connection failed", lines)
        bus.state = 1
        bus.owner_changed("", ":1.9")
        self.assertEqual(bus.groups, {})
        bus.state = 2
        bus.emit("org.freedesktop.Avahi.Server", "StateChanged", "/", [2, ""])
        self.assertEqual(bus.names(), [BASE, BASE + " #2"])
        self.assertEqual(lines.count(f"Adding Avahi service '{BASE}'"), 2)

    def test_host_name_change_republishes(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        [first] = bus.groups
        bus.emit("org.freedesktop.Avahi.Server", "StateChanged", "/", [1, ""])
        self.assertEqual(bus.groups, {})
        self.assertEqual(publisher.published, ())
        bus.emit("org.freedesktop.Avahi.Server", "StateChanged", "/", [2, ""])
        [second] = bus.groups
        self.assertNotEqual(first, second)
        self.assertEqual(publisher.published, (BASE, BASE + " #2"))

    def test_daemon_absent_then_started(self) -> None:
        bus = FakeBus(avahi=False)
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        self.assertEqual(len(lines), 1)
        self.assertIn("The Avahi daemon is not running", lines[0])
        bus.avahi = True
        bus.owner_changed("", ":1.2")
        self.assertEqual(bus.names(), [BASE, BASE + " #2"])
        self.assertNotIn("Avahi client failure: Daemon connection failed", lines)

    def test_no_bus_warns_once_and_retries(self) -> None:
        bus = FakeBus()
        error = ConnectError(string="no socket")
        publisher, lines, clock = self.make(error, error, error, bus)
        publisher.publish(RECORDS)
        clock.advance(publish.RETRY_INTERVAL)
        clock.advance(publish.RETRY_INTERVAL)
        self.assertEqual(bus.names(), [])
        self.assertEqual(len(lines), 1)
        self.assertIn("Failed to create Avahi client: cannot connect to the D-Bus system bus at",
                      lines[0])
        clock.advance(publish.RETRY_INTERVAL)
        self.assertEqual(bus.names(), [BASE, BASE + " #2"])

    def test_bus_lost_reconnects(self) -> None:
        first, second = FakeBus(), FakeBus()
        publisher, lines, _ = self.make(first, second)
        publisher.publish(RECORDS)
        for callback in first.lost:
            callback(first, None)
        self.assertIn("Avahi client failure: Daemon connection failed", lines)
        self.assertEqual(second.names(), [BASE, BASE + " #2"])

    def test_withdraw_frees_the_group(self) -> None:
        bus = FakeBus()
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        self.successResultOf(publisher.withdraw())
        self.assertEqual(bus.groups, {})
        self.assertTrue(bus.disconnected)
        self.assertEqual(lines[-1], f"Removing Avahi service '{BASE} #2'")
        bus.owner_changed("", ":1.7")
        self.assertEqual(bus.groups, {})

    def test_withdraw_while_registering_is_quiet(self) -> None:
        bus = FakeBus()
        held: Deferred[None] = Deferred()
        bus.hold = held
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        self.successResultOf(publisher.withdraw())
        self.assertTrue(bus.disconnected)
        held.callback(None)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([line for line in lines if "failed" in line.lower()], [])

    def test_daemon_gone_while_registering_then_back(self) -> None:
        bus = FakeBus()
        hold: Deferred[None] = Deferred()
        bus.hold = hold
        publisher, lines, _ = self.make(bus)
        publisher.publish(RECORDS)
        bus.owner_changed(":1.4", "")
        bus.groups.clear()
        hold.errback(RemoteError("org.freedesktop.DBus.Error.NoReply"))
        self.assertEqual([line for line in lines if "Failed" in line], [])
        bus.owner_changed("", ":1.5")
        self.assertEqual(bus.names(), [BASE, BASE + " #2"])

    def test_withdraw_stops_retrying(self) -> None:
        publisher, _, clock = self.make(ConnectError(string="no socket"))
        publisher.publish(RECORDS)
        self.successResultOf(publisher.withdraw())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_service_publishes_at_start_and_withdraws_at_stop(self) -> None:
        bus = FakeBus()
        publisher, _, _ = self.make(bus)
        service = PublisherService(publisher, lambda: RECORDS)
        service.startService()
        self.assertEqual(len(bus.names()), 2)
        self.successResultOf(service.stopService())
        self.assertEqual(bus.groups, {})


class TapTests(TestCase):
    def services(self, *argv: str) -> list[Any]:
        from stapsrv.app import tap
        self.patch(os, "geteuid", lambda: 1000)
        options = tap.Options()
        options.parseOptions(["--ssl", self.mktemp(), *argv])
        return list(tap.makeService(options))

    def test_publisher_follows_the_server(self) -> None:
        from stapsrv.app.service import CompileServerService
        server, publisher, accepts, _notifier, _ = self.services()
        self.assertIsInstance(accepts, AcceptErrorLog)
        self.assertIsInstance(server, CompileServerService)
        self.assertIsInstance(publisher, PublisherService)
        self.assertIsInstance(publisher.publisher, AvahiPublisher)

    def test_no_avahi(self) -> None:
        _, publisher, _, _notifier, _ = self.services("--no-avahi")
        self.assertIsInstance(publisher.publisher, NullPublisher)


# -- Integration: a private bus, avahi-daemon, real servers and clients ------

HELLO = 'probe begin { println("x"); exit() }'
_SERVICE_LINE = re.compile(r"^=;lo;IPv4;([^;]*);_stap\._tcp;local;[^;]*;([^;]*);(\d+);(.*)$")


def _unescape(name: str) -> str:
    """avahi-browse -p escapes bytes as ``\\DDD`` (decimal)."""
    return re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), name)


_bus: Any = None


def private_bus() -> Any:
    """One private bus with avahi-daemon for all the tests, stopped at exit."""
    global _bus
    if _bus is None:
        import atexit

        from tests.helpers.privatebus import PrivateBus
        _bus = PrivateBus().start()
        atexit.register(_bus.stop)
    return _bus


class AvahiIntegrationTests(TestCase):
    """Real servers publishing through avahi-daemon on a private system bus."""

    timeout = 120

    def setUp(self) -> None:
        from tests.helpers import require_header_release, require_program
        require_program("avahi-browse")
        require_program("stap")
        require_program("certutil")
        self.release = require_header_release()
        self.bus = private_bus()
        if self.bus.avahi is None or self.bus.avahi.poll() is not None:
            self.bus.start_avahi()

    def server(self, *arguments: str, env: dict[str, str] | None = None) -> Any:
        from tests.helpers.realserver import remove_tree, start_stapsrv
        server = start_stapsrv(arguments, release=self.release,
                               env=self.bus.environment if env is None else env)
        self.addCleanup(remove_tree, server.base)
        self.addCleanup(server.stop)
        return server

    def client(self, kind: Any = None) -> Any:
        from tests.helpers.realserver import CLIENT_48, Client, remove_tree, scratch_directory
        kind = kind or CLIENT_48
        kind.require()
        base = scratch_directory("client-")
        self.addCleanup(remove_tree, base)
        return Client(base, kind)

    async def browse(self) -> list[tuple[str, str, int, list[str]]]:
        """``avahi-browse -rtp _stap._tcp``: (name, address, port, TXT) per service."""
        from tests.helpers.realserver import run
        # Bounded: -r waits for every service it has seen to resolve, and a
        # stale one (a server stopped by the test before) can keep it
        # waiting; a cut dump is only a partial one, and callers browse again.
        out, err, code = await run(["timeout", "10", "/usr/bin/avahi-browse", "-rtp",
                                    "_stap._tcp"], env=self.bus._env())
        self.assertIn(code, (0, 124), err.decode())
        found = []
        for line in out.decode().splitlines():
            match = _SERVICE_LINE.match(line)
            if match:
                txt = re.findall(r'"([^"]*)"', match.group(4))
                found.append((_unescape(match.group(1)), match.group(2), int(match.group(3)), txt))
        return found

    async def wait_for(self, port: int, count: int, timeout: float = 60.0
                       ) -> list[tuple[str, str, int, list[str]]]:
        """The services on ``port`` once there are ``count`` of them."""
        from twisted.internet import reactor
        deadline = time.monotonic() + timeout
        while True:
            services = [s for s in await self.browse() if s[2] == port]
            if len(services) == count or time.monotonic() > deadline:
                return services
            await deferLater(reactor, 0.2)

    def releases(self) -> list[str]:
        running = os.uname().release
        return [running] + ([self.release] if self.release != running else [])

    async def test_releases_in_the_kernel_store_are_advertised_too(self) -> None:
        from stapsrv.kernel.store import KernelStore
        from tests.helpers.realserver import owned_directory, scratch_directory, test_user
        base = scratch_directory("store-")
        from tests.helpers.realserver import remove_tree
        self.addCleanup(remove_tree, base)
        directory = owned_directory(base / "store")
        store = KernelStore(directory, 1 << 30)
        store.open()
        # A release of the served series that is not installed, as a fetch leaves it.
        stored = re.sub(r"-\d+-", "-9999-", self.release, count=1)
        store.commit(store.begin(stored), stored, [])
        user = test_user()
        for path in [directory, *directory.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        server = self.server("--kernel-store", str(directory))
        releases = [*self.releases(), stored]
        services = await self.wait_for(server.port, len(releases))
        self.assertEqual(sorted(txt[3] for _, _, _, txt in services),
                         sorted(f"sysinfo={release} x86_64" for release in releases))

    async def test_an_arm64_client_finds_the_stored_arm64_release(self) -> None:
        """Issue 30: a server that builds for arm64 advertises a stored arm64
        release as ``REL arm64``, so a 4.8 or 5.5 client picking a server
        for ``-a arm64 -r REL`` finds it, and one for x86_64 does not."""
        from stapsrv.kernel.store import KernelStore
        from tests.helpers.realserver import (
            CLIENT_48,
            CLIENT_55,
            owned_directory,
            remove_tree,
            scratch_directory,
            test_user,
        )
        base = scratch_directory("store-")
        self.addCleanup(remove_tree, base)
        directory = owned_directory(base / "store")
        store = KernelStore(directory, 1 << 30)
        store.open()
        # An arm64 release of the served series, as a fetch leaves it.
        stored = re.sub(r"-\d+-[a-z0-9-]+$", "-9999-arm64", self.release)
        store.commit(store.begin(stored), stored, [])
        user = test_user()
        for path in [directory, *directory.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        server = self.server("--kernel-store", str(directory), "--fetch-architectures", "arm64")
        releases = self.releases()
        services = await self.wait_for(server.port, len(releases) + 1)
        self.assertEqual(sorted(txt[3] for _, _, _, txt in services), sorted(
            [*(f"sysinfo={release} x86_64" for release in releases),
             f"sysinfo={stored} arm64"]))
        env = self.bus.environment
        clients = {}
        for kind in (CLIENT_48, CLIENT_55):
            client = clients[kind.version] = self.client(kind)
            await client.trust(server.spec)
            out, err, code = await client.stap("--list-servers=online,trusted,compatible",
                                               "-a", "arm64", "-r", stored, env=env)
            ours = [line for line in err.decode().splitlines()
                    if line.startswith(" host=") and f"port={server.port} " in line]
            self.assertEqual(len(ours), 1, f"{kind.version}: {err.decode()}")
            self.assertIn(f'sysinfo="{stored} arm64" version=4.8', ours[0])
            out, err, code = await client.stap("--list-servers=online,trusted,compatible",
                                               "-r", stored, env=env)
            self.assertNotIn(f"port={server.port} ", err.decode(), kind.version)
        # The 4.8 client sends its arm64 request to the server it found
        # (the stored release is an empty stand-in: the answer is a refusal).
        client = clients[CLIENT_48.version]
        out, err, code = await client.stap("--use-server", "-a", "arm64", "-r", stored,
                                           "-p4", "-e", HELLO, env=env)
        self.assertNotIn("Unable to find a suitable compile server", err.decode())
        self.assertIn("Accepted connection", server.log())
        self.assertIn(stored, server.log())

    async def test_browse_shows_the_records_until_the_server_stops(self) -> None:
        server = self.server("-D", "X=1")
        releases = self.releases()
        services = await self.wait_for(server.port, len(releases))
        serial = server.serial()
        self.assertEqual(sorted((txt[3], txt) for _, _, _, txt in services), sorted(
            (f"sysinfo={release} x86_64",
             [f"certinfo={serial}", "version=4.8", "optinfo=-DX=1",
              f"sysinfo={release} x86_64"]) for release in releases))
        names = sorted(name for name, _, _, _ in services)
        base = records.service_name(socket.gethostname())
        self.assertEqual(names, sorted([base, f"{base} #2"][:len(releases)]))
        self.assertEqual({address for _, address, _, _ in services}, {"127.0.0.1"})
        self.assertIn(f"Adding Avahi service '{base}'", server.log())
        server.stop()
        self.assertEqual(await self.wait_for(server.port, 0), [])
        self.assertIn("Removing Avahi service '", server.log())

    async def test_real_client_finds_and_uses_the_server(self) -> None:
        await self.check_discovery(None)

    async def test_real_5_5_client_finds_and_uses_the_server(self) -> None:
        from tests.helpers.realserver import CLIENT_55
        await self.check_discovery(CLIENT_55)

    async def check_discovery(self, kind: Any) -> None:
        server = self.server()
        await self.wait_for(server.port, len(self.releases()))
        client = self.client(kind)
        await client.trust(server.spec)
        env = self.bus.environment
        out, err, code = await client.stap("--list-servers=all", env=env)
        serial = server.serial()
        self.assertIn(f' address=127.0.0.1 port={server.port} sysinfo="{self.release} x86_64"'
                      f' version=4.8 certinfo="{serial}"', err.decode())
        # The default selection: online, trusted and compatible with -r REL.
        out, err, code = await client.stap("--list-servers=online,trusted,compatible",
                                           "-r", self.release, env=env)
        ours = [line for line in err.decode().splitlines()
                if line.startswith(" host=") and f"port={server.port} " in line]
        self.assertEqual(len(ours), 1, err.decode())
        self.assertIn(f'sysinfo="{self.release} x86_64" version=4.8 certinfo="{serial}"',
                      ours[0])
        out, err, code = await client.stap("--use-server", "-r", self.release, "-p4",
                                           "-e", HELLO, env=env)
        self.assertEqual(code, 0, err.decode())
        [module] = client.modules()
        self.assertEqual(out.decode().strip(), module)
        self.assertIn("Accepted connection", server.log())

    async def test_mok_info_leads_each_client_to_its_mok(self) -> None:
        """A server with a MOK advertises both of its fingerprints; the 4.8
        client (mokutil showing SHA-1) and the 5.5 client (SHA-256) both read
        them, pick this server by them and get a module signed with it."""
        from cryptography import x509
        from cryptography.hazmat.primitives.hashes import SHA256

        from stapsrv.identity import mok
        from tests.helpers.der import verify_appended_signature
        from tests.helpers.realserver import (
            CLIENT_48,
            CLIENT_55,
            fake_mokutil,
            generate_server_mok,
            owned_directory,
            remove_tree,
            scratch_directory,
        )
        systemtap_dir = owned_directory(scratch_directory("mok-avahi-") / "systemtap")
        self.addCleanup(remove_tree, systemtap_dir.parent)
        mok_dir = generate_server_mok(systemtap_dir)
        der = (mok_dir / mok.CERTIFICATE).read_bytes()
        sha1, sha256 = mok.fingerprint(der), mok.fingerprint(der, SHA256())
        server = self.server(env=dict(self.bus.environment, SYSTEMTAP_DIR=str(systemtap_dir)))
        await self.wait_for(server.port, len(self.releases()))
        for kind, label, value in ((CLIENT_48, "SHA1", sha1), (CLIENT_55, "SHA256", sha256)):
            client = self.client(kind)
            await client.trust(server.spec)
            env = dict(self.bus.environment)
            out, err, code = await client.stap("--list-servers=all", env=env)
            ours = [line for line in err.decode().splitlines()
                    if line.startswith(" host=") and f"port={server.port} " in line]
            self.assertTrue(ours, err.decode())
            self.assertIn(f'mok_fingerprints="{sha1}, {sha256}"', ours[0], kind.version)
            fake_mokutil(client.dir / "bin", label, value)
            env.update(SYSTEMTAP_SIGN="1", PATH=f"{client.dir / 'bin'}:{client.env()['PATH']}")
            out, err, code = await client.stap("--use-server", "-r", self.release, "-p4",
                                               "-e", HELLO, env=env)
            self.assertEqual(code, 0, f"{kind.version}: {err.decode()}")
            [module] = client.modules()
            verify_appended_signature((client.cwd / module).read_bytes(),
                                      x509.load_der_x509_certificate(der))

    async def test_avahi_restart_brings_the_records_back(self) -> None:
        server = self.server()
        count = len(self.releases())
        self.assertEqual(len(await self.wait_for(server.port, count)), count)
        self.bus.stop_avahi()
        self.bus.start_avahi()
        self.assertEqual(len(await self.wait_for(server.port, count)), count)
        log = server.log()
        self.assertIn("Avahi client failure: Daemon connection failed", log)
        self.assertEqual(log.count("Adding Avahi service '"), 2, log)

    async def test_two_servers_get_distinct_names(self) -> None:
        first, second = self.server(), self.server()
        count = len(self.releases())
        services = (await self.wait_for(first.port, count)
                    + await self.wait_for(second.port, count))
        names = [name for name, _, _, _ in services]
        self.assertEqual(len(names), 2 * count)
        self.assertEqual(len(set(names)), len(names))

    async def test_without_a_bus_the_server_warns_once_and_compiles(self) -> None:
        missing = f"unix:path={self.bus.root}/no-such-socket"
        server = self.server(env={"DBUS_SYSTEM_BUS_ADDRESS": missing})
        client = self.client()
        await client.trust(server.spec)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        from twisted.internet import reactor

        # Past at least one retry of the bus connection.
        await deferLater(reactor, publish.RETRY_INTERVAL + 1)
        self.assertEqual(server.log().count("Failed to create Avahi client"), 1, server.log())
        self.assertNotIn("Adding Avahi service", server.log())

    async def test_server_started_before_avahi_publishes_when_it_appears(self) -> None:
        from twisted.internet import reactor
        self.bus.stop_avahi()
        server = self.server()
        deadline = time.monotonic() + 10
        while "The Avahi daemon is not running" not in server.log():
            self.assertLess(time.monotonic(), deadline, server.log())
            await deferLater(reactor, 0.1)
        self.bus.start_avahi()
        count = len(self.releases())
        self.assertEqual(len(await self.wait_for(server.port, count)), count)
        log = server.log()
        self.assertEqual(log.count("The Avahi daemon is not running"), 1, log)
        self.assertNotIn("Avahi client failure", log)
