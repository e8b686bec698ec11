"""Load on a real server: many real clients at once, many idle connections.

Sized for the CI budget on a 2-core machine (both tests together take
about a minute and a half); the server runs with its default --max-threads (the
number of CPUs), so new scripts queue for a translator slot.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.faults import FaultMixin, cafile
from tests.helpers.rawclient import OpenConnection
from tests.helpers.realserver import Client, ServerProcess, scratch_directory
from tests.helpers.waiting import poll

#: Clients, requests in all, and how the requests mix.
CLIENTS = 16
REPEATED_SCRIPTS = 4
REPEATS = 20  # of each repeated script: 80 requests
NEW_SCRIPTS = 20
#: Idle TLS connections held open while a real client compiles.
IDLE = 500
#: The soft RLIMIT_NOFILE a server usually starts with (systemd's default).
USUAL_SOFT_NOFILE = 1024


class ManyClientsTests(FaultMixin, TestCase):
    timeout = 400

    def clone_client(self, trusted: Client) -> Client:
        """A client sharing ``trusted``'s trust in the server (a copy of its
        SYSTEMTAP_DIR) but with a working directory of its own."""
        base = scratch_directory("client-")
        self.addCleanup(shutil.rmtree, base, True)
        client = Client(base)
        shutil.copytree(trusted.systemtap_dir, client.systemtap_dir, dirs_exist_ok=True)
        return client

    async def test_sixteen_clients_a_hundred_requests(self) -> None:
        """16 real clients at once send 100 -p4 requests in all: 80 repeat
        4 scripts (compiled once, then answered from a cache), 20 are new
        (really compiled).  Every request gets rc 0 and its module."""
        server = self.start_server()
        first = await self.trusted_client(server)
        clients = [first] + [self.clone_client(first) for _ in range(CLIENTS - 1)]
        run = uuid.uuid4().hex[:12]
        jobs = [(f"load_repeated_{k}", f'probe begin {{ println("load repeated {k}"); exit() }}')
                for k in range(REPEATED_SCRIPTS)] * REPEATS
        jobs += [(f"load_new_{j}", f'probe begin {{ println("load new {j} {run}"); exit() }}')
                 for j in range(NEW_SCRIPTS)]
        random.Random(8).shuffle(jobs)

        async def one_client(client: Client, work: list[tuple[str, str]]) -> list[str]:
            problems = []
            for name, script in work:
                out, err, code = await self.compile(client, server, "-p4", "-m", name,
                                                    "-e", script)
                module = client.cwd / f"{name}.ko"
                if code != 0 or client.modules() != [module.name] or \
                        module.read_bytes()[:4] != b"\x7fELF":
                    problems.append(f"{name}: rc {code}, files {client.modules()}, "
                                    f"stderr {err.decode()[-400:]!r}")
                for leftover in client.modules():
                    (client.cwd / leftover).unlink()
            return problems

        start = time.monotonic()
        problems = await gatherResults([Deferred.fromCoroutine(one_client(client, jobs[index::CLIENTS]))
                                        for index, client in enumerate(clients)])
        elapsed = time.monotonic() - start
        failed = [problem for per_client in problems for problem in per_client]
        self.assertEqual(failed, [], f"{len(failed)} of {len(jobs)} requests failed")
        log = server.log()
        self.assertGreaterEqual(log.count(" complete"), len(jobs))
        # Repeats are answered from the response cache (or share the compile
        # under way): the translator ran at most once per distinct script.
        compiles = log.count("Options passed from the client")
        self.assertLessEqual(compiles, NEW_SCRIPTS + REPEATED_SCRIPTS)
        self.assertGreaterEqual(compiles, NEW_SCRIPTS)
        await self.assert_no_leftovers(server)
        print(f"\n{len(jobs)} requests from {CLIENTS} clients in {elapsed:.1f} s")

    async def test_idle_connections_do_not_block_a_compile(self) -> None:
        """500 TLS connections that finish the handshake and send nothing
        (the server's --request-timeout is 120 s, so they stay) do not hold
        processing slots: a real client's new -p4 compile succeeds while
        they are open, and none of them is closed.  The server
        needs a descriptor per connection: it starts here with the soft
        RLIMIT_NOFILE most servers get (1024, systemd's default) and must
        raise it itself."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(USUAL_SOFT_NOFILE, hard), hard))
        try:
            server = self.start_server("--request-timeout", "120")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        nofile = limits_of_nofile(server)
        self.assertGreater(int(nofile.split("/")[0]), USUAL_SOFT_NOFILE,
                           f"the server did not raise its soft RLIMIT_NOFILE: {nofile}")
        client = await self.trusted_client(server)
        connections: list[OpenConnection] = []
        self.addCleanup(lambda: [connection.close() for connection in connections])
        started = time.monotonic()
        await deferToThread(open_idle_connections, server, IDLE, connections)
        opened = time.monotonic() - started
        self.assertEqual(len(connections), IDLE)
        held = await poll(lambda: open_descriptors(server.pid) >= IDLE, 10.0)
        self.assertTrue(held, f"server holds {open_descriptors(server.pid)} descriptors")

        started = time.monotonic()
        out, err, code = await self.compile(client, server, "-p4", "-m", "among_idle",
                                            "-e", f'probe begin {{ println("idle '
                                            f'{uuid.uuid4().hex}"); exit() }}')
        elapsed = time.monotonic() - started
        # Compiled while every idle connection is still open (how long the
        # compile took is bench/'s business, not a test's).
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["among_idle.ko"])
        still_open = sum(1 for connection in connections if is_open(connection))
        self.assertEqual(still_open, IDLE, "idle connections the server closed early")
        print(f"\n{IDLE} handshakes in {opened:.1f} s; compile among them in {elapsed:.1f} s; "
              f"server RLIMIT_NOFILE soft/hard {nofile}")
        for connection in connections:
            connection.close()
        await self.assert_still_serves(server, client)


def limits_of_nofile(server: ServerProcess) -> str:
    with open(f"/proc/{server.pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return "/".join(line.split()[3:5])
    return "?"


def open_descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def open_idle_connections(server: ServerProcess, count: int,
                          into: list[OpenConnection]) -> None:
    """``count`` TLS connections with the handshake done (4 at a time; the
    first that cannot finish its handshake within 10 s stops the lot)."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(OpenConnection, server.port, cafile(server), timeout=10.0)
                   for _ in range(count)]
        try:
            for future in futures:
                into.append(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            for future in futures:
                if future.done() and not future.cancelled() and future.exception() is None:
                    if future.result() not in into:
                        into.append(future.result())
            raise


def is_open(connection: OpenConnection) -> bool:
    """The server has not closed ``connection`` (what TLS 1.3 sends after
    the handshake, session tickets, is consumed without data)."""
    sock = connection.sock
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except ssl.SSLWantReadError:
        return True
    except (ssl.SSLError, OSError):
        return False
    finally:
        sock.setblocking(True)
