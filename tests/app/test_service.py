"""The compile service end to end: the real stap client against stapsrv
running as an unprivileged user on loopback (twistd stap-server)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.hashes import SHA1, SHA256
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from stapsrv.identity import mok
from tests.helpers import signature_hash
from tests.helpers.der import verify_appended_signature
from tests.helpers.realclient import HELLO, RealClientMixin, run_p2_sample
from tests.helpers.realserver import (
    CLIENT_48,
    CLIENT_55,
    Client,
    ServerProcess,
    fake_mokutil,
    generate_server_mok,
    owned_directory,
    remove_tree,
    scratch_directory,
    shared_server,
    test_user,
    venv_bin,
)
from tests.helpers.staprun import MODULE_ALTERED, MODULE_OK, staprun_verdict


class ClientChecks(RealClientMixin):
    """What every supported client gets from the shared server: run once per
    client (``kind``)."""

    def setUp(self) -> None:
        super().setUp()
        self.server = shared_server()

    async def test_trusted_server_is_listed(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap("--list-servers=trusted")
        self.assertEqual(code, 0, err.decode())
        self.assertIn(f'certinfo="{self.server.serial()}"', err.decode())

    async def test_p4_module_comes_back(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        [module] = client.modules()
        self.assertRegex(module, r"^stap_[0-9a-f]+_\d+\.ko$")
        self.assertEqual(out.decode().strip(), module)
        self.assertEqual((client.cwd / module).read_bytes()[:4], b"\x7fELF")

    async def test_p2_script_file_tapset_define_and_arguments(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await run_p2_sample(client, self.server, self.release)
        self.assertEqual(code, 0, err.decode())
        self.assertIn("mytap_hello:", out.decode())
        self.assertIn("# probes", out.decode())

    async def test_semantic_error_is_shown(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-e",
            "probe nosuchprobe { exit() }")
        self.assertEqual(code, 1)
        self.assertIn("semantic error: while resolving probe point: identifier 'nosuchprobe'",
                      err.decode())
        self.assertIn("Passes: via server failed.", err.decode())
        self.assertEqual(client.modules(), [])

    async def stapusr_module(self) -> tuple[Client, Path]:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "--privilege=stapusr",
            "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        module, signature = client.modules()
        self.assertEqual(signature, module + ".sgn")
        return client, client.cwd / module

    async def test_stapusr_module_is_signed_by_the_server_key(self) -> None:
        client, module = await self.stapusr_module()
        public_key = self.server.certificate().public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        signature = module.with_name(module.name + ".sgn").read_bytes()
        self.assertEqual(len(signature), 512)
        self.assertEqual(signature_hash(public_key, signature, module.read_bytes()), "sha256")
        self.assertIn(f"Client version is {self.kind.version}", self.server.log())

    async def test_clients_staprun_accepts_the_signature(self) -> None:
        client, module = await self.stapusr_module()
        self.assertEqual(await staprun_verdict(client, self.server.spec, module), MODULE_OK)
        # The same check refuses a module changed after signing.
        with open(module, "ab") as out:
            out.write(b"\0")
        self.assertEqual(await staprun_verdict(client, self.server.spec, module),
                         MODULE_ALTERED)

    async def test_mok_signed_module_for_the_clients_fingerprint_form(self) -> None:
        """A Secure Boot client (SYSTEMTAP_SIGN, mokutil listing a server MOK
        in the form this client's mokutil shows) gets a module signed with it."""
        systemtap_dir = owned_directory(scratch_directory("mok-server-") / "systemtap")
        self.addCleanup(remove_tree, systemtap_dir.parent)
        server = self.own_server(env={"SYSTEMTAP_DIR": str(systemtap_dir)})
        mok_dir = generate_server_mok(systemtap_dir)
        der = (mok_dir / mok.CERTIFICATE).read_bytes()
        label = "SHA1" if self.kind is CLIENT_48 else "SHA256"
        value = mok.fingerprint(der, SHA1() if label == "SHA1" else SHA256())
        client = await self.trusted_client(server)
        fake_mokutil(client.dir / "bin", label, value)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", HELLO,
            env={"SYSTEMTAP_SIGN": "1", "PATH": f"{client.dir / 'bin'}:{client.env()['PATH']}"})
        self.assertEqual(code, 0, err.decode())
        [module] = client.modules()
        verify_appended_signature((client.cwd / module).read_bytes(),
                                  x509.load_der_x509_certificate(der))


class CompileTests(ClientChecks, TestCase):
    """The 4.8 client (Debian bookworm's), and what only it is checked for."""

    async def test_script_from_stdin(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-",
            stdin=HELLO.encode())
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(client.modules()), 1)

    async def test_module_name(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-m", "hello_mod",
            "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(client.modules(), ["hello_mod.ko"])

    async def test_four_clients_at_once(self) -> None:
        clients = [await self.trusted_client(self.server) for _ in range(4)]
        results = await gatherResults([
            client.stap(f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-e",
                        f'probe begin {{ println("client {index}"); exit() }}')
            for index, client in enumerate(clients)])
        for client, (out, err, code) in zip(clients, results):
            self.assertEqual(code, 0, err.decode())
            self.assertEqual(len(client.modules()), 1)

    async def test_unsupported_release_is_explained(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", "5.10.0-99-amd64", "-p4", "-e", HELLO)
        self.assertEqual(code, 1)
        text = err.decode()
        self.assertIn("Server: This server does not build modules for kernel release "
                      "'5.10.0-99-amd64'.", text)
        self.assertIn(self.release, text)
        self.assertNotIn("Unable to open file", text)

    async def test_client_that_does_not_trust_the_server_is_refused(self) -> None:
        client = self.new_client()
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p4", "-e", HELLO)
        self.assertNotEqual(code, 0)
        self.assertIn("Unable to connect to a server.", err.decode())
        self.assertEqual(client.modules(), [])

    async def test_log_lines_and_no_scratch_left(self) -> None:
        client = await self.trusted_client(self.server)
        out, err, code = await client.stap(
            f"--use-server={self.server.spec}", "-r", self.release, "-p2", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        log = self.server.log()
        stamp = r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}: "
        for line in (r"===== compile server pid \d+ starting as " + test_user().pw_name + " =====",
                     r"Using network address \[127\.0\.0\.1\]:" + str(self.server.port),
                     r"Accepted connection from 127\.0\.0\.1:\d+",
                     r"Client version is 4\.8",
                     r"Options passed from the client: -r" + re.escape(self.release) + " -p2 ",
                     r"Request from 127\.0\.0\.1:\d+ complete"):
            self.assertRegex(log, re.compile("^" + stamp + line, re.M))
        # The upstream testsuite reads the port as the 9th field.
        port_line = next(l for l in log.splitlines() if "Using network address" in l)
        self.assertTrue(port_line.split()[8].endswith(f":{self.server.port}"))
        self.assertEqual(os.listdir(self.server.base / "tmp"), [])

    async def test_server_user_trusts_its_own_certificate(self) -> None:
        systemtap_dir = self.server.base.parent / "stapsrv-systemtap"
        listing = subprocess.run(
            ["certutil", "-L", "-d", f"sql:{systemtap_dir}/ssl/client"],
            capture_output=True, text=True)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertRegex(listing.stdout, r"stap-server\s+P,P,P")


class Client55Tests(ClientChecks, TestCase):
    """SystemTap 5.5, upstream's current client, against the same server."""

    kind = CLIENT_55


class LimitTests(RealClientMixin, TestCase):
    async def test_oversize_compressed_request_is_explained(self) -> None:
        server = self.own_server("--max-compressed-request", "300")
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", HELLO)
        self.assertEqual(code, 1)
        self.assertRegex(err.decode(), r"Server: The request is \d+ bytes compressed; this "
                         r"server accepts at most 300 bytes \(its --max-compressed-request\)\.")
        self.assertIn("request file is too large", server.log())

    async def test_oversize_uncompressed_request_is_explained(self) -> None:
        server = self.own_server("--max-request-size", "100")
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-p4", "-e", HELLO + " " * 200)
        self.assertEqual(code, 1)
        self.assertRegex(err.decode(), r"Server: The request is \d+ bytes uncompressed; this "
                         r"server accepts 1 to 100 bytes \(its --max-request-size\)\.")
        self.assertIn("Uncompressed request size of", server.log())

    async def test_max_threads_zero_serialises(self) -> None:
        server = self.own_server("--max-threads", "0")
        clients = [await self.trusted_client(server) for _ in range(3)]
        results = await gatherResults([
            client.stap(f"--use-server={server.spec}", "-r", self.release, "-p2", "-e",
                        f'probe begin {{ println("serial {index}"); exit() }}')
            for index, client in enumerate(clients)])
        self.assertEqual([code for _, _, code in results], [0, 0, 0])
        log = server.log()
        self.assertIn("Concurrency disabled", log)
        events = [("start" if "Options passed" in line else "end")
                  for line in log.splitlines()
                  if "Options passed" in line or re.search(r"Request from .* complete", line)]
        self.assertEqual(events, ["start", "end"] * 3, log)

    async def test_many_threads_overlap(self) -> None:
        server = self.own_server("--max-threads", "4")
        clients = [await self.trusted_client(server) for _ in range(3)]
        await gatherResults([
            client.stap(f"--use-server={server.spec}", "-r", self.release, "-p2", "-e",
                        f'probe begin {{ println("overlap {index}"); exit() }}')
            for index, client in enumerate(clients)])
        self.assertIn("Processing 3 concurrent requests...", server.log())


class RootTests(TestCase):
    def test_root_is_refused(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("needs root to check the refusal")  # not a dependency: a fact
        base = scratch_directory("root-")
        self.addCleanup(remove_tree, base)
        env = {k: v for k, v in os.environ.items() if k != "STAP_PR11197_OVERRIDE"}
        result = subprocess.run(
            [venv_bin("twistd"), "--nodaemon", "--pidfile=", "stap-server", "--port", "0",
             "--listen", "127.0.0.1", "--ssl", str(base / "ssl")],
            capture_output=True, text=True, env=env, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("For security reasons, invocation of stap-serverd as root is not "
                      "supported.", result.stdout + result.stderr)
        self.assertFalse((base / "ssl").exists(), "nothing was created")


class ConfigModeTests(RealClientMixin, TestCase):
    async def test_two_configured_servers_in_one_process(self) -> None:
        from tests.helpers.realserver import _PORT_LINE, owned_directory, server_environment

        base = scratch_directory("config-mode-")
        self.addCleanup(remove_tree, base)
        conf = owned_directory(base / "conf.d")
        for name in ("one", "two"):
            (conf / f"{name}.conf").write_text(
                f"NICKNAME={name}\nRELEASE={self.release}\nSSL={base / name}-ssl\n"
                f"LOG={base / name}.log\n")
        global_file = base / "global"
        global_file.write_text(f"CONFIG_PATH={conf}\nLOG_FILE={base / 'main.log'}\n")
        argv = [venv_bin("twistd"), "--nodaemon", "--pidfile=", f"--logfile={base / 'twistd.log'}",
                "stap-server", "--config", str(global_file)]
        server = ServerProcess("stapsrv --config", argv, server_environment(base, "stapsrv"),
                               base, base / "one.log")
        self.addCleanup(server.stop)
        server.wait_for_port()
        second_log = base / "two.log"
        second_port = server.wait_for_port(log=second_log)
        self.assertNotEqual(server.port, second_port)
        self.assertEqual(len(_PORT_LINE.findall(server.log())), 1, "each log has its own lines")
        client = self.new_client()
        await client.trust(f"127.0.0.1:{second_port}")
        out, err, code = await client.stap(f"--use-server=127.0.0.1:{second_port}", "-r", self.release,
                                           "-p4", "-e", HELLO)
        self.assertEqual(code, 0, err.decode())
        self.assertIn("Accepted connection", server.log(second_log))
        self.assertNotIn("Accepted connection", server.log())


class ServedReleasesTests(TestCase):
    """What the server advertises: its given releases, then what its
    kernel store holds and the policy lets it serve."""

    def test_given_then_stored_releases(self) -> None:
        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool

        from stapsrv.app.service import CompileServerService
        from stapsrv.config.convert import server_config
        from stapsrv.kernel.fetch import KernelFetcher
        from stapsrv.kernel.store import KernelStore

        config = server_config(releases=["6.1.0-57-amd64"], fetch=False)
        server = CompileServerService(config, reactor)
        given = config.releases
        self.assertEqual(server.served_releases(), given)
        store = KernelStore(Path(self.mktemp()), 10 << 20)
        store.open()
        for release in ("6.1.0-55-amd64", "6.1.0-57-amd64", "5.10.0-30-amd64"):
            store.commit(store.begin(release), release, [])
        server.kernels = KernelFetcher(store, reactor, ThreadPool(), ("6.1.0-*-amd64",))
        self.assertEqual(server.served_releases(), (*given, "6.1.0-55-amd64"))
        added: list[str] = []
        server.on_releases_changed.append(lambda: added.append("changed"))
        server._release_added("6.1.0-55-amd64")
        self.assertEqual(added, ["changed"])

    def test_the_suites_series_join_the_policy(self) -> None:  # --fetch-suites (#27)
        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool

        from stapsrv.app.service import CompileServerService
        from stapsrv.config.convert import server_config
        from stapsrv.kernel.fetch import KernelFetcher
        from stapsrv.kernel.privateapt import PrivateApt
        from stapsrv.kernel.store import KernelStore

        store = KernelStore(Path(self.mktemp()), 10 << 20)
        store.open()
        for release in ("6.1.0-55-amd64", "6.12.95+deb12-amd64", "6.12.118+deb13-amd64"):
            store.commit(store.begin(release), release, [])
        names = ["linux-headers-6.12.95+deb12-amd64", "linux-headers-6.12.95+deb12-common",
                 "linux-headers-6.12.118+deb13-cloud-amd64", "linux-headers-amd64"]
        for patterns, expected in (([], ("6.1.0-*-amd64", "6.12.*+deb12-amd64",
                                         "6.12.*+deb13-cloud-amd64")),
                                   (["6.1.0-*-amd64"], ("6.1.0-*-amd64",))):
            config = server_config(releases=["6.1.0-57-amd64"], fetch_suites=["bookworm"],
                                   fetch_releases=patterns)
            server = CompileServerService(config, reactor)
            apt = PrivateApt(store.directory / ".apt", config.fetch_suites, "amd64")
            fetcher = server.kernels = KernelFetcher(store, reactor, ThreadPool(),
                                                     ("6.1.0-*-amd64",), apt=apt)
            changed: list[str] = []
            server.on_releases_changed.append(lambda: changed.append("changed"))
            server._suites_updated(fetcher, ("6.1.0-*-amd64",), "amd64", names)
            server._suites_updated(fetcher, ("6.1.0-*-amd64",), "amd64", names)
            self.assertEqual(fetcher.patterns, expected)
            self.assertEqual(changed, ["changed"] if not patterns else [])
            # Another architecture's lists (--fetch-architectures) add theirs.
            server._suites_updated(fetcher, ("6.1.0-*-amd64",), "arm64",
                                   ["linux-headers-6.1.0-41-arm64", names[0]])
            self.assertEqual(fetcher.patterns,
                             (*expected, "6.1.0-*-arm64") if not patterns else expected)
            served = server.served_releases()[len(config.releases):]
            self.assertEqual(sorted(served), ["6.1.0-55-amd64", "6.12.95+deb12-amd64"]
                             if not patterns else ["6.1.0-55-amd64"])



class OpenFileLimitTests(TestCase):
    """The soft descriptor limit is raised to the hard one at start (no
    real limit is changed: getrlimit and setrlimit are fakes)."""

    def limits_after(self, soft: int, hard: int, refuse: bool = False,
                     nr_open: int = 1 << 20) -> list[tuple[int, int]]:
        from stapsrv.app import service
        calls: list[tuple[int, int]] = []
        self.patch(service, "_original_open_files", None)
        self.patch(service, "nr_open", lambda: nr_open)

        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            if refuse:
                raise ValueError("not allowed")
            calls.append(limits)

        self.patch(service.resource, "getrlimit", lambda which: (soft, hard))
        self.patch(service.resource, "setrlimit", setrlimit)
        self.original = service.raise_open_file_limit()
        return calls

    def test_soft_goes_to_hard(self) -> None:
        self.assertEqual(self.limits_after(1024, 524288), [(524288, 524288)])
        self.assertEqual(self.limits_after(1024, 4096), [(4096, 4096)])

    def test_nothing_to_do_at_the_hard_limit(self) -> None:
        self.assertEqual(self.limits_after(1024, 1024), [])

    def test_unlimited_hard_means_a_million(self) -> None:
        import resource
        self.assertEqual(self.limits_after(1024, resource.RLIM_INFINITY),
                         [(1 << 20, resource.RLIM_INFINITY)])

    def test_the_raise_has_a_ceiling(self) -> None:
        import resource
        self.assertEqual(self.limits_after(1024, 1 << 30), [(1 << 20, 1 << 30)])
        self.assertEqual(self.limits_after(1024, resource.RLIM_INFINITY, nr_open=65536),
                         [(65536, resource.RLIM_INFINITY)])

    def test_the_original_limit_is_kept_for_the_translators(self) -> None:
        self.limits_after(1024, 524288)
        self.assertEqual(self.original, (1024, 524288))
        self.limits_after(1024, 1024)
        self.assertIsNone(self.original, "nothing raised, nothing to give back")
        self.limits_after(1024, 4096, refuse=True)
        self.assertIsNone(self.original)

    def test_a_refusal_is_not_an_error(self) -> None:
        self.assertEqual(self.limits_after(1024, 4096, refuse=True), [])
