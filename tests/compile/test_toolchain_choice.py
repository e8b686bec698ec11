"""The handler and toolchains: the cache key differs by toolchain, a
request no toolchain fits is refused with one Server: line before anything
is fetched or compiled, and a 5.x client is given the 5.x translator."""

from __future__ import annotations


from pathlib import Path

from attrs import evolve

from stapsrv.compile.context import RequestContext
from stapsrv.compile.job import parse_job
from stapsrv.compile.sandbox import Sandbox
from stapsrv.core.cmdline import translator_argv
from stapsrv.kernel.toolchains import host_toolchain, load
from tests.helpers.archives import RELEASE, request
from tests.helpers.handlers import CachedHandlerCase
from tests.helpers.vectors import members
from tests.kernel.test_toolchains import make_root

BIG = 1 << 30


class ToolchainChoiceTests(CachedHandlerCase):
    def setUp(self) -> None:
        super().setUp()
        self.forky = load(make_root(self.base / "toolchains" / "forky"))
        self.host = host_toolchain("4.8")

    def test_the_cache_key_differs_by_toolchain(self) -> None:
        handler = self.cached_handler()
        job = parse_job(request("-p4", "-eok", version=b"5.5"), BIG)
        keys = {handler._make_key(job, None), handler._make_key(job, self.forky),
                handler._make_key(job, evolve(self.forky, digest="0" * 16)),
                handler._make_key(job, evolve(self.forky, name="trixie"))}
        self.assertEqual(len(keys), 4, keys)
        self.assertEqual(handler._make_key(job, self.forky), handler._make_key(job, self.forky))

    async def test_no_toolchain_fits_one_server_line_and_no_compile(self) -> None:
        handler = self.cached_handler()
        handler.toolchains = [self.host, self.forky]
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.home / ".s")
        found = members(await self.raw(handler, request(
            "-p4", "-eok", release="6.12.95+deb12-amd64", version=b"4.8")))
        self.assertEqual(found["rc"], b"1")
        lines = found["stderr"].decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(
            "Server: No toolchain of this server builds for kernel release "
            "'6.12.95+deb12-amd64' modules that a SystemTap 4.8 client's staprun loads: "
            "host (SystemTap 4.8) builds for kernels up to 6.1 only; forky (SystemTap 5.6) "
            "makes modules for SystemTap 5.x clients' staprun"), lines[0])
        self.assertTrue(lines[0].endswith("A SystemTap 5.x client would be served."))
        self.assertEqual(self.runs(), 0)

    async def test_a_5x_client_gets_the_5x_toolchain(self) -> None:
        handler = self.cached_handler()
        handler.toolchains = [self.host, self.forky]
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.home / ".s")
        for version, expected in ((b"5.5", self.forky), (b"4.8", self.host)):
            context = RequestContext("peer")
            job = parse_job(request("-p4", "-eok", version=version), BIG)
            self.assertIsNone(await handler._choose_toolchain(job, context, with_tree=False))
            self.assertEqual(context.toolchain, expected)

    async def test_the_host_alone_chooses_nothing(self) -> None:
        handler = self.cached_handler()
        handler.toolchains = [self.host]
        context = RequestContext("peer")
        job = parse_job(request("-p4", "-eok", version=b"5.5"), BIG)
        self.assertIsNone(await handler._choose_toolchain(job, context, with_tree=True))
        self.assertIsNone(context.toolchain)

    def test_another_toolchains_translator_sees_the_clients_files(self) -> None:
        """A release of the host's distribution (installed here) through
        forky's translator: --sysroot at the host's files, before the
        client's options; the host's translator gets none; the cache key
        names the root."""
        handler = self.cached_handler()
        handler.toolchains = [self.host, self.forky]
        handler.distribution = "bookworm"
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.home / ".s")
        argv = translator_argv("/usr/bin/stap", RELEASE,
                               handler.server_options(RELEASE, self.forky), "/t",
                               ["-p4", "-e", "probe begin {}"])
        self.assertIn("--sysroot=/sysroot", argv)
        self.assertLess(argv.index("--sysroot=/sysroot"), argv.index("--client-options"))
        self.assertEqual(handler.user_space(RELEASE, self.forky).root, Path("/"))
        for toolchain in (None, self.host):
            self.assertNotIn("--sysroot=", [option.flag for option in
                                             handler.server_options(RELEASE, toolchain)])
        job = parse_job(request("-p4", "-eok", version=b"5.5"), BIG)
        with_root = handler._make_key(job, self.forky)
        handler.distribution = "forky"
        self.assertIsNone(handler.user_space(RELEASE, self.forky).root)
        self.assertNotIn("--sysroot=", [option.flag for option in
                                         handler.server_options(RELEASE, self.forky)])
        self.assertNotEqual(handler._make_key(job, self.forky), with_root)

    def test_another_toolchain_gets_no_fixed_runtime(self) -> None:
        handler = self.cached_handler()
        flags = [option.flag for option in handler.server_options(RELEASE)]
        self.assertIn("-R", flags)
        flags = [option.flag for option in handler.server_options(RELEASE, self.forky)]
        self.assertNotIn("-R", flags)
        self.assertEqual(handler.translator(self.forky), "/usr/bin/stap")
        self.assertEqual(handler.translator(None), str(self.stap))
