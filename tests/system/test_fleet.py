"""Several servers as an operator runs them: listening through endpoints
(socket activation, the PROXY protocol behind a real HAProxy), sharing one
identity and the Redis fleet cache, with Prometheus scraping them."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import require_program
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realhaproxy import PROXY_SOURCE, Backend, start_haproxy
from tests.helpers.realredis import free_port
from tests.helpers.realserver import (
    ServerProcess,
    remove_tree,
    scratch_directory,
    start_stapsrv,
)


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
        self.assertIn(f"Request from 127.0.0.1:", server.log())

    async def test_proxied_server_sees_the_clients_address(self) -> None:
        require_program("haproxy")
        server = self.started(start_stapsrv(
            ["--endpoint", "haproxy:tcp:0:interface=127.0.0.1"], release=self.release))
        base = scratch_directory("haproxy-")
        self.addCleanup(remove_tree, base)
        proxy = start_haproxy(self, base / "haproxy", [Backend("s1", server.port)])
        client = self.new_client()
        await client.trust(proxy.spec)
        out, err, code = await client.stap(f"--use-server={proxy.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
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
        base = scratch_directory("haproxy-")
        self.addCleanup(remove_tree, base)
        proxy = start_haproxy(self, base / "haproxy", [Backend("s1", server.port)])
        client = self.new_client()
        await client.trust(proxy.spec)
        out, err, code = await client.stap(f"--use-server={proxy.spec}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        self.assertIn("does not accept requests from 127.0.0.1 (its --allow list)",
                      err.decode())
