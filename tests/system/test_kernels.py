"""The kernel store with the real client and the real Debian archive:
releases that are not installed are fetched through apt, once, and built
for, and the modules run on those releases' kernels, booted in a VM; what
cannot be fetched is refused with one clear line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from stapsrv.kernel.store import PARTS
from tests.helpers.archive_releases import cloud_release, missing_release, older_abi_release
from tests.helpers.gate import CompileGate
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import (
    CLIENT_48,
    Client,
    ServerProcess,
    as_server_user,
    owned_directory,
    remove_tree,
    scratch_directory,
    server_environment,
    venv_bin,
)
from tests.helpers.vm import run_in_vm

SYMBOLS_WARNING = "Kernel function symbol table missing"


def store_contents(store: Path) -> list[str]:
    """The store's trees (and leftovers), not its parts (``.debug`` and the others)."""
    if not store.is_dir():
        return []
    return sorted(entry.name for entry in store.iterdir() if entry.name not in PARTS)


def symbols_of(store: Path) -> list[str]:
    """The releases whose symbols the store holds, and leftovers."""
    return store_contents(store / ".debug")


def kernels_command(store: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``python -m stapsrv.cli.kernels`` as the server's user."""
    base = store.parent
    return subprocess.run(
        as_server_user([venv_bin("python"), "-m", "stapsrv.cli.kernels", "--store", str(store),
                        *words]),
        env=server_environment(base, "stapsrv"), capture_output=True, text=True, timeout=900)


class KernelStoreTests(RealClientMixin, TestCase):
    def new_store(self) -> Path:
        base = scratch_directory("kernels-")
        self.addCleanup(remove_tree, base)
        return owned_directory(base / "store")

    def store_server(self, store: Path, *arguments: str) -> ServerProcess:
        return self.own_server("--kernel-store", str(store), *arguments)

    async def compile_for(self, server: ServerProcess, release: str,
                          script: str = HELLO) -> tuple[list[str], str, int]:
        client = await self.trusted_client(server)
        self.clients.append(client)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", release, "-p4", "-e", script)
        return client.modules(), err.decode(), code

    def setUp(self) -> None:
        super().setUp()
        self.clients: list[Client] = []

    async def output_on(self, release: str, client: Client) -> str:
        """What the client's module prints on ``release``'s kernel (it must
        end well)."""
        module = next(client.cwd.glob("*.ko"))
        found = await run_in_vm(module, release, CLIENT_48)
        self.assertEqual(found.status, 0, f"{found.summary}\n{found.console}")
        return found.output

    async def test_older_abi_is_fetched_built_for_and_cached(self) -> None:
        release = older_abi_release()
        store = self.new_store()
        server = self.store_server(store)
        modules, err, code = await self.compile_for(server, release)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(modules), 1)
        self.assertNotIn(SYMBOLS_WARNING, err)
        self.assertEqual(await self.output_on(release, self.clients[-1]), "hi\n")
        log = server.log()
        self.assertIn(f"Fetching kernel {release}: linux-headers-{release} ", log)
        self.assertRegex(log, rf"Fetched kernel {release} in [0-9.]+ s")
        modules, err, code = await self.compile_for(server, release)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(modules), 1)
        self.assertIn("from the cache", server.log())
        self.assertEqual(server.log().count(f"Fetching kernel {release}"), 1)
        listed = kernels_command(store, "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn(f"\n{release}\t", listed.stdout)
        self.assertIn(f"\tSystem.map\tlinux-headers-{release}=", listed.stdout)
        # A new server on the same store builds without fetching again.
        server.stop()
        again = self.store_server(store)
        modules, err, code = await self.compile_for(again, release)
        self.assertEqual(code, 0, err)
        self.assertNotIn("Fetching kernel", again.log())
        await self.removal_waits_for_the_compile_reading_it(store, release)
        removed = kernels_command(store, "remove", release)
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertEqual(store_contents(store), [])
        self.assertNotIn(release, symbols_of(store))

    async def removal_waits_for_the_compile_reading_it(self, store: Path, release: str) -> None:
        """``kernels remove`` while a compile reads the stored release (its
        compiler held at a gate): refused, nothing removed, the compile
        ends well; once it is answered the removal goes through."""
        base = scratch_directory("gate-")
        self.addCleanup(remove_tree, base)
        gate = CompileGate(base)
        self.addCleanup(gate.close)
        server = self.store_server(store, *gate.server_arguments())
        client = await self.trusted_client(server)
        compiled = client.stap(f"--use-server={server.spec}", "-r", release, "-g", "-p4", "-e",
                               gate.script("stored"))
        await gate.reached()
        refused = kernels_command(store, "remove", release)
        self.assertEqual(refused.returncode, 1, refused.stdout)
        self.assertIn(f"Release {release} is in use by a compile; not removed", refused.stderr)
        self.assertIn(release, store_contents(store))
        self.assertIn(release, symbols_of(store))
        gate.release()
        out, err, code = await compiled
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(client.modules()), 1)
        server.stop()

    async def test_two_clients_share_one_fetch_of_a_flavour(self) -> None:
        release = cloud_release()
        store = self.new_store()
        server = self.store_server(store)
        results = await gatherResults([
            Deferred.fromCoroutine(self.compile_for(server, release)),
            Deferred.fromCoroutine(self.compile_for(
                server, release, 'probe begin { println("other"); exit() }'))])
        for modules, err, code in results:
            self.assertEqual(code, 0, err)
            self.assertEqual(len(modules), 1)
            # The cloud image is LZ4-compressed; its map is made all the same.
            self.assertNotIn(SYMBOLS_WARNING, err)
        outputs = [await self.output_on(release, client) for client in self.clients]
        self.assertEqual(sorted(outputs), ["hi\n", "other\n"])
        log = server.log()
        self.assertEqual(log.count(f"Fetching kernel {release}:"), 1)
        self.assertEqual(log.count(f"Fetching the symbols of kernel {release}:"), 1)
        self.assertEqual(store_contents(store), [release])
        self.assertIn(release, symbols_of(store))

    async def test_what_cannot_be_fetched_is_refused_in_one_line(self) -> None:
        store = self.new_store()
        server = self.store_server(store)
        missing = missing_release()
        modules, err, code = await self.compile_for(server, missing)
        self.assertEqual((code, modules), (1, []))
        self.assertIn(f"Server: Cannot build for kernel release '{missing}': the Debian "
                      f"archive this server uses has no kernel headers for release {missing} "
                      f"(no package linux-headers-{missing}).\n", err)
        self.assertEqual(store_contents(store), [])
        # No symbols either, not even half-made ones (the installed release's
        # may be in the making: the server makes them when it starts).
        self.assertEqual([name for name in symbols_of(store) if missing in name], [])
        # Outside the fetch policy: not even looked up.
        policy = self.store_server(store, "--fetch-releases", "5.10.0-*-amd64")
        older = older_abi_release()
        modules, err, code = await self.compile_for(policy, older)
        self.assertEqual((code, modules), (1, []))
        self.assertIn(f"Server: This server does not build modules for kernel release "
                      f"'{older}'.", err)
        self.assertIn("fetches releases matching: 5.10.0-*-amd64.", err)
        self.assertNotIn("Fetching kernel", policy.log())
        off = self.store_server(store, "--no-fetch")
        modules, err, code = await self.compile_for(off, older)
        self.assertEqual(code, 1)
        self.assertNotIn("fetches releases", err)
        self.assertEqual(store_contents(store), [])

    async def test_archive_unreachable_installed_release_still_served(self) -> None:
        store = self.new_store()
        config = store.parent / "apt.conf"
        # A proxy nobody listens on: every download fails at once.
        config.write_text('Acquire::http::Proxy "http://127.0.0.1:9/";\n'
                          'Acquire::Retries "0";\n')
        config.chmod(0o644)
        server = self.own_server("--kernel-store", str(store), env={"APT_CONFIG": str(config)})
        older = older_abi_release()
        modules, err, code = await self.compile_for(server, older)
        self.assertEqual((code, modules), (1, []))
        self.assertIn(f"Server: Cannot build for kernel release '{older}': downloading "
                      f"kernel {older} failed: ", err)
        self.assertEqual(store_contents(store), [])
        modules, err, code = await self.compile_for(server, self.release)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(modules), 1)
        # Without its symbols (they cannot be fetched either), said once.
        self.assertIn(SYMBOLS_WARNING, err)
        self.assertEqual(symbols_of(store), [])
        modules, err, code = await self.compile_for(server, self.release,
                                                    'probe begin { println(2); exit() }')
        self.assertEqual(code, 0, err)
        self.assertEqual(server.log().count(f"No symbols for kernel {self.release}:"), 1)
