"""A request's architecture in the handler: refused before anything is
fetched or compiled when it cannot be built here; another architecture's
release cross-built."""

from __future__ import annotations

from typing import Any

from attrs import evolve

from stapsrv.core.cmdline import ServerOption
from stapsrv.compile.context import RequestContext
from stapsrv.compile.job import parse_job
from stapsrv.compile.sandbox import Sandbox
from stapsrv.kernel.toolchains import host_toolchain, load
from tests.helpers.archives import make_zip
from tests.helpers.handlers import CachedHandlerCase
from tests.helpers.vectors import members
from tests.kernel.test_toolchains import make_root

ARM64 = "6.1.0-57-arm64"


def arm64_request(*arguments: str, arch: str = "arm64", release: str = ARM64,
                  version: bytes = b"4.8") -> bytes:
    entries = [(f"argv{i}", a.encode(), 0o100644) for i, a in enumerate(arguments, 1)]
    entries += [("sysinfo", f"sysinfo: {release} {arch}".encode(), 0o100644),
                ("locale", b"LANG=C.UTF-8\n", 0o100644), ("version", version, 0o100644)]
    return make_zip(entries)


class ArchitectureTests(CachedHandlerCase):
    async def refused(self, architectures: tuple[str, ...], body: bytes) -> list[str]:
        handler = self.cached_handler()
        handler.architectures = architectures
        found = members(await self.raw(handler, body))
        self.assertEqual(found["rc"], b"1")
        self.assertEqual(self.runs(), 0)
        return found["stderr"].decode().splitlines()

    async def test_a_server_without_arm64_refuses_it(self) -> None:
        lines = await self.refused(("amd64",), arm64_request("-aarm64", f"-r{ARM64}", "-p4",
                                                              "-eok"))
        self.assertEqual(lines, ["Server: This server does not build modules for architecture "
                                 "'arm64'; it builds for: x86_64."])

    async def test_sysinfo_and_dash_a_must_agree(self) -> None:
        lines = await self.refused(("amd64", "arm64"), arm64_request(
            "-aarm64", f"-r{ARM64}", "-p4", "-eok", arch="x86_64"))
        self.assertEqual(lines, ["Server: The request is for architecture 'x86_64' (its "
                                 "sysinfo) but its -a names 'arm64'; they must agree."])

    async def test_an_arm64_kernel_asked_for_x86_64(self) -> None:
        lines = await self.refused(("amd64", "arm64"), arm64_request(
            f"-r{ARM64}", "-p4", "-eok", arch="x86_64"))
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("give stap -a arm64", lines[0])

    async def test_a_toolchain_without_the_cross_compiler_refuses(self) -> None:
        # A forky root made before its package list had the cross compiler.
        handler = self.cached_handler()
        handler.architectures = ("amd64", "arm64")
        handler.toolchains = [host_toolchain("4.8"),
                              load(make_root(self.base / "toolchains" / "forky"))]
        handler.releases.sandbox = Sandbox(home=self.home, systemtap_dir=self.home / ".s")
        found = members(await self.raw(handler, arm64_request(
            "-aarm64", f"-r{ARM64}", "-p4", "-eok", version=b"5.5")))
        self.assertEqual(found["rc"], b"1")
        self.assertEqual(found["stderr"].decode().splitlines(), [
            f"Server: Kernel release '{ARM64}' is an arm64 kernel; toolchain forky (SystemTap "
            "5.6), which serves this client, has no aarch64-linux-gnu-gcc cross compiler "
            "(the server's administrator can add it: python -m stapsrv.cli.toolchains "
            "update forky)."])
        self.assertEqual(self.runs(), 0)

    def cross_handler(self, compilers: tuple[str, ...]) -> Any:
        handler = self.cached_handler()
        handler.architectures = ("amd64", "arm64")
        handler.toolchains = [host_toolchain("4.8"), load(make_root(
            self.base / "toolchains" / "forky", ("gcc-12", *compilers)))]
        tree = self.base / "tree"
        tree.mkdir()
        (tree / ".kernelvariables").write_text(
            "CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12\n")
        self.patch(type(handler.releases), "tree", lambda releases, release: tree)
        return handler

    def test_a_toolchain_with_the_kernels_cross_compiler_builds_arm64(self) -> None:
        handler = self.cross_handler(("aarch64-linux-gnu-gcc-12",))
        job = parse_job(arm64_request("-aarm64", f"-r{ARM64}", "-p4", "-eok",
                                      version=b"5.5"), 1 << 20)
        context = RequestContext("peer")
        chosen = handler._toolchain_for(job, with_tree=True)
        self.assertEqual(chosen.name, "forky")
        context.toolchain = chosen
        self.assertIsNone(handler._cross_refusal(job, context))
        # The 4.8 client: the host's, whose cross gcc-12 make setup installs.
        job48 = parse_job(arm64_request("-aarm64", f"-r{ARM64}", "-p4", "-eok"), 1 << 20)
        self.assertEqual(handler._toolchain_for(job48, with_tree=True).name, "host")

    def test_another_cross_gcc_than_the_kernels_does_not_serve(self) -> None:
        handler = self.cross_handler(("aarch64-linux-gnu-gcc-14",))
        job = parse_job(arm64_request("-aarm64", f"-r{ARM64}", "-p4", "-eok",
                                      version=b"5.5"), 1 << 20)
        # Before the tree is there, any cross gcc lets the fetch go on ...
        context = RequestContext("peer")
        context.toolchain = handler._toolchain_for(job, with_tree=False)
        self.assertIsNone(handler._cross_refusal(job, context))
        # ... the headers' own (aarch64-linux-gnu-gcc-12) decides.
        refusal = handler._toolchain_for(job, with_tree=True)
        self.assertIsInstance(refusal, str)
        self.assertIn("has no aarch64-linux-gnu-gcc-12, which the kernel's headers call",
                      refusal)

    def test_an_arm64_release_is_cross_built(self) -> None:
        handler = self.cached_handler()
        handler.architectures = ("amd64", "arm64")
        # The server's own -a is for its own architecture's releases.
        handler.config = evolve(handler.config, server_options=(
            ServerOption("-a", "x86_64"), ServerOption("-D", "A=1")))

        def words(release: str) -> list[str]:
            return [word for option in handler.server_options(release)
                    for word in option.words()]
        arm64 = words(ARM64)
        self.assertEqual(arm64.count("-a"), 1, arm64)
        self.assertEqual(arm64[arm64.index("-a") + 1], "arm64")
        self.assertIn("-BCROSS_COMPILE=aarch64-linux-gnu-", arm64)
        self.assertIn("-DA=1", arm64)
        amd64 = words("6.1.0-57-amd64")
        self.assertEqual(amd64[amd64.index("-a") + 1], "x86_64")
        self.assertFalse(any(word.startswith("-BCROSS") for word in amd64))
