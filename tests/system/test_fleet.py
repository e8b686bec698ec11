"""Several servers as an operator runs them: listening through endpoints
(socket activation, the PROXY protocol behind a real HAProxy), sharing one
identity and the Redis fleet cache, with Prometheus scraping them."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stapsrv.config.secret import create_secret
from tests.helpers import require_program
from tests.helpers.forgedproxy import start_forged_proxy
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realhaproxy import PROXY_SOURCE, Backend, HAProxy, start_haproxy
from tests.helpers.realprometheus import start_prometheus
from tests.helpers.realredis import RedisServer, free_port, start_redis
from tests.helpers.realserver import (
    Client,
    ServerProcess,
    owned_directory,
    remove_tree,
    scratch_directory,
    start_stapsrv,
    test_user,
)
from tests.helpers.waiting import wait_until

#: Behind HAProxy: the PROXY protocol on a free loopback port.
PROXIED = "haproxy:tcp:0:interface=127.0.0.1"


def fleet_arguments(redis: RedisServer, directory: Path) -> list[str]:
    """What every instance of a fleet is started with to share the cache:
    the Redis URL and the fleet's secret (made in ``directory`` once)."""
    secret = directory / "fleet.secret"
    if not secret.exists():
        user = test_user()
        create_secret(secret, owner=(user.pw_uid, user.pw_gid))
    return ["--fleet-cache", redis.url, "--fleet-secret", str(secret)]


def healthz(port: int) -> tuple[int, str]:
    """The status and text of an instance's /healthz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_health(port: int, status: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        try:
            last = healthz(port)
        except OSError:
            last = None
        if last is not None and last[0] == status:
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"/healthz on {port} never answered {status}: {last}")


def served(server: ServerProcess) -> int:
    """Requests this instance took from a client (its log's count)."""
    return server.log().count("Accepted connection from")


def poke(port: int, timeout: float = 10.0) -> None:
    """Connect once to 127.0.0.1:``port`` (and hang up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class EndpointTests(RealClientMixin, TestCase):
    def started(self, server: ServerProcess) -> ServerProcess:
        self.addCleanup(remove_tree, server.base)
        self.addCleanup(server.stop)
        return server

    def haproxy_in_front(self, server: ServerProcess) -> HAProxy:
        """A real HAProxy on loopback with ``server`` as its one backend."""
        base = scratch_directory("haproxy-")
        self.addCleanup(remove_tree, base)
        return start_haproxy(self, base / "haproxy", [Backend("s1", server.port)])

    async def stap_through(self, spec: str) -> tuple[bytes, int]:
        """A new client's ``-p4`` of HELLO through ``spec``: its stderr and exit code."""
        client = self.new_client()
        await client.trust(spec)
        out, err, code = await client.stap(f"--use-server={spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        return err, code

    async def test_socket_activation_hands_the_listener_to_twistd(self) -> None:
        require_program("systemd-socket-activate")
        port = free_port()
        # systemd-socket-activate binds the port, and execs twistd (keeping
        # the pid, as LISTEN_PID requires) once a first connection comes.
        # Twisted wants LISTEN_FDNAMES too (systemd 227 and later set it).
        server = self.started(start_stapsrv(
            ["--endpoint", "systemd:domain=INET:index=0"], release=self.release, wait=False,
            prefix=["systemd-socket-activate", "--fdname=stapsrv", "-l", f"127.0.0.1:{port}"]))
        poke(port)
        self.assertEqual(server.wait_for_port(), port)
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)
        self.assertIn("Request from 127.0.0.1:", server.log())

    async def test_proxied_server_sees_the_clients_address(self) -> None:
        require_program("haproxy")
        server = self.started(start_stapsrv(
            ["--endpoint", "haproxy:tcp:0:interface=127.0.0.1"], release=self.release))
        proxy = self.haproxy_in_front(server)
        err, code = await self.stap_through(proxy.spec)
        self.assertEqual(code, 0, err.decode())
        log = server.log()
        self.assertIn("Clients' addresses come from the PROXY protocol header", log)
        # HAProxy connects from 127.0.0.3; the client, and so the log and
        # the --allow list, from 127.0.0.1.
        accepted = [line for line in log.splitlines() if "Accepted connection from" in line]
        self.assertEqual(len(accepted), 2, log)  # the trust probe and the compile
        for line in accepted:
            self.assertIn("Accepted connection from 127.0.0.1:", line)
        self.assertNotIn(PROXY_SOURCE, log)
        self.assertIn("Request from 127.0.0.1:", log)

    async def test_allow_list_applies_to_the_address_behind_the_proxy(self) -> None:
        require_program("haproxy")
        # Only the proxy's own address is allowed: the client behind it is refused.
        server = self.started(start_stapsrv(
            ["--endpoint", "haproxy:tcp:0:interface=127.0.0.1", "--allow", PROXY_SOURCE],
            release=self.release))
        proxy = self.haproxy_in_front(server)
        err, code = await self.stap_through(proxy.spec)
        self.assertNotEqual(code, 0)
        self.assertIn("does not accept requests from 127.0.0.1 (its --allow list)",
                      err.decode())

    async def test_proxy_header_is_believed_only_from_proxy_from(self) -> None:
        require_program("haproxy")
        # Only HAProxy's address may send the header; only 192.0.2.10 may compile.
        metrics_port = free_port()
        server = self.started(start_stapsrv(
            ["--endpoint", PROXIED, "--proxy-from", PROXY_SOURCE, "--allow", "192.0.2.10",
             "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"], release=self.release))
        proxy = self.haproxy_in_front(server)
        # Peers writing their own header claiming the allowed address: one
        # from 127.0.0.1 (reaching the port directly), one from the proxy's.
        direct = await start_forged_proxy(self, server.port, "127.0.0.1", "192.0.2.10")
        trusted = await start_forged_proxy(self, server.port, PROXY_SOURCE, "192.0.2.10")
        client = self.new_client()
        await client.trust(trusted.spec)
        self.assertIn("Accepted connection from 192.0.2.10:", server.log())

        out, err, code = await client.stap(f"--use-server={direct.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        self.assertEqual(client.modules(), [])
        log = server.log()
        closed = [line for line in log.splitlines() if "not a trusted proxy" in line]
        self.assertTrue(closed, log)
        for line in closed:
            self.assertRegex(line, r"Closed a connection from 127\.0\.0\.1:\d+: not a trusted "
                                   r"proxy \(--proxy-from\), so its PROXY header is not read")
        self.assertEqual(log.count("Accepted connection from 192.0.2.10:"), 1, log)
        self.assertIn("believed from 127.0.0.3/32 (--proxy-from)", log)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as page:
            self.assertIn(f"stapsrv_untrusted_proxy_connections_total {len(closed)}.0",
                          page.read().decode())

        # HAProxy's header is believed: the client behind it is 127.0.0.1, not allowed.
        out, err, code = await client.stap(f"--use-server={proxy.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        self.assertIn("does not accept requests from 127.0.0.1 (its --allow list)",
                      err.decode())
        # A header from a trusted address is believed, forged or not.
        out, err, code = await client.stap(f"--use-server={trusted.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)
        self.assertIn("Request from 192.0.2.10:", server.log())


class MetricsTests(RealClientMixin, TestCase):
    async def test_prometheus_scrapes_requests_and_cache_hits(self) -> None:
        metrics_port = free_port()
        server = self.own_server("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1")
        wait_for_health(metrics_port, 200)
        client = await self.trusted_client(server)
        for _ in range(3):
            out, err, code = await client.stap(f"--use-server={server.spec}", "-r",
                                               self.release, "-p4", "-e", HELLO)
            self.assertEqual(code, 0, err.decode())
        base = scratch_directory("prometheus-")
        self.addCleanup(remove_tree, base)
        prometheus = start_prometheus(self, base, [f"127.0.0.1:{metrics_port}"])
        self.assertEqual(prometheus.wait_for_value("sum(stapsrv_requests_total)", 3), 3)
        self.assertEqual(prometheus.value('stapsrv_requests_total{outcome="compiled"}'), 1)
        self.assertEqual(prometheus.value('stapsrv_cache_hits_total{tier="disk"}'), 2)
        self.assertGreater(prometheus.value("sum(stapsrv_cache_hits_total)") or 0, 0)
        self.assertEqual(prometheus.value('stapsrv_translator_runs_total{result="ok"}') and 1, 1)
        self.assertEqual(prometheus.value(
            'stapsrv_request_duration_seconds_count{answer="cached"}'), 2)
        self.assertGreater(prometheus.value("process_resident_memory_bytes") or 0, 0)


class FleetMixin(RealClientMixin):
    def proxy_in_front(self, servers: list[ServerProcess],
                       health_ports: list[int]) -> object:
        base = scratch_directory("haproxy-")
        self.addCleanup(remove_tree, base)  # type: ignore[attr-defined]
        backends = [Backend(f"s{index}", server.port, health)
                    for index, (server, health) in enumerate(zip(servers, health_ports))]
        proxy = start_haproxy(self, base, backends)
        for backend in backends:
            proxy.wait_for_state(backend.name, "UP")
        return proxy

    def instance(self, *arguments: str, env: dict[str, str] | None = None,
                 ssl_dir: Path | None = None) -> tuple[ServerProcess, int]:
        health = free_port()
        server = start_stapsrv(["--endpoint", PROXIED, "--metrics",
                                f"tcp:{health}:interface=127.0.0.1", *arguments],
                               release=self.release, env=env, ssl_dir=ssl_dir)
        self.addCleanup(remove_tree, server.base)  # type: ignore[attr-defined]
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        wait_for_health(health, 200)
        return server, health

    async def compile_through(self, client: Client, spec: str, script: str = HELLO) -> None:
        out, err, code = await client.stap(f"--use-server={spec}", "-r", self.release,
                                           "-p4", "-e", script)
        if code != 0:
            raise AssertionError(f"compile through {spec} failed ({code}): {err.decode()}")


class HealthTests(FleetMixin, TestCase):
    async def test_unrunnable_translator_is_unhealthy_and_haproxy_routes_around(self) -> None:
        require_program("haproxy")
        # The instance's translator is reached through a directory the test
        # can make unreadable (the translator itself is shared).
        base = scratch_directory("translator-")
        self.addCleanup(remove_tree, base)
        hidden = base / "bin"
        hidden.mkdir()
        (hidden / "stap").symlink_to("/usr/bin/stap")
        self.addCleanup(hidden.chmod, 0o755)
        sick, sick_health = self.instance("--no-sandbox", env={"SYSTEMTAP_STAP": str(hidden / "stap")})
        well, well_health = self.instance("--no-sandbox")
        proxy = self.proxy_in_front([sick, well], [sick_health, well_health])

        hidden.chmod(0)
        text = wait_for_health(sick_health, 503)
        self.assertIn("FAIL translator", text)
        proxy.wait_for_state("s0", "DOWN")
        before = served(sick)
        client = self.new_client()
        await client.trust(proxy.spec)
        for _ in range(3):
            await self.compile_through(client, proxy.spec)
        self.assertEqual(served(sick), before, "HAProxy sent a client to the sick instance")
        self.assertEqual(served(well), 4)

        hidden.chmod(0o755)
        self.assertTrue(wait_for_health(sick_health, 200).startswith("ok"))
        proxy.wait_for_state("s0", "UP")


class FleetTests(FleetMixin, TestCase):
    async def test_three_instances_behind_haproxy(self) -> None:
        require_program("haproxy")
        base = scratch_directory("fleet-")
        self.addCleanup(remove_tree, base)
        redis = start_redis(self, base / "redis")
        # One identity for the fleet: the first instance makes it, the
        # others use the same directory.
        ssl_dir = owned_directory(base / "ssl")
        first = self.instance(*fleet_arguments(redis, base), ssl_dir=ssl_dir)
        others = [self.instance(*fleet_arguments(redis, base), ssl_dir=ssl_dir)
                  for _ in range(2)]
        instances = [first, *others]
        servers = [server for server, _ in instances]
        # The others found the first one's identity: none made its own.
        self.assertIn("Generating a new certificate", first[0].log())
        for server, _ in others:
            self.assertNotIn("Generating a new certificate", server.log())
        proxy = self.proxy_in_front(servers, [health for _, health in instances])

        client = self.new_client()
        await client.trust(proxy.spec)
        script = 'probe begin { println("fleet"); exit() }'
        await self.compile_through(client, proxy.spec, script)
        compiled = [index for index, server in enumerate(servers)
                    if "Request from 127.0.0.1:" in server.log()]
        self.assertEqual(len(compiled), 1, "one instance compiled")
        compiler = servers[compiled[0]]
        log = compiler.log()
        self.assertIn("Accepted connection from 127.0.0.1:", log)
        self.assertNotIn(PROXY_SOURCE, log, "the log shows the client, not HAProxy")

        # With that instance out of rotation, another answers from the fleet cache.
        proxy.command(f"disable server stapsrv/s{compiled[0]}")
        await self.compile_through(client, proxy.spec, script)
        fleet_hits = [index for index, server in enumerate(servers)
                      if "from the cache" in server.log()]
        self.assertEqual(len(fleet_hits), 1)
        self.assertNotEqual(fleet_hits[0], compiled[0])
        with urllib.request.urlopen(
                f"http://127.0.0.1:{instances[fleet_hits[0]][1]}/metrics", timeout=5) as page:
            self.assertIn('stapsrv_cache_hits_total{tier="fleet"} 1.0', page.read().decode())
        proxy.command(f"enable server stapsrv/s{compiled[0]}")
        proxy.wait_for_state(f"s{compiled[0]}", "UP")

        # One instance is stopped while a batch of clients runs: every
        # request still succeeds (its own finish; new ones go elsewhere).
        clients = [self.new_client() for _ in range(6)]
        await gatherResults([Deferred.fromCoroutine(c.trust(proxy.spec)) for c in clients])

        async def lane(c: Client) -> None:
            for _ in range(3):
                await self.compile_through(c, proxy.spec, script)

        victim = servers[1]
        accepted = victim.log().count("Accepted connection from")
        batch = gatherResults([Deferred.fromCoroutine(lane(c)) for c in clients])
        # SIGTERM once the victim has taken a request of the batch.
        self.assertTrue(await deferToThread(wait_until, lambda: victim.log().count(
            "Accepted connection from") > accepted), victim.log())
        os.kill(victim.pid, signal.SIGTERM)
        await batch
        victim.process.wait(60)
        proxy.wait_for_state("s1", "DOWN")
