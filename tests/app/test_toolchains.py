"""The toolchains a server takes up when it starts: none to choose from
without another than the host's or without the sandbox; a root whose
translator does not run in the sandbox is named and left out, as a
damaged one is."""

from __future__ import annotations

from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from stapsrv.app.toolchains import host_translator, server_toolchains
from stapsrv.compile.sandbox import Sandbox
from stapsrv.config.values import ServerConfig
from stapsrv.kernel.toolchains import toolchains_directory
from tests.helpers import require_program
from tests.helpers.handlers import Events
from tests.kernel.test_toolchains import make_root


class ServerToolchainsTests(TestCase):
    def setUp(self) -> None:
        require_program("bwrap")
        self.base = Path(self.mktemp()).absolute()
        self.store = self.base / "kernels"
        self.config = ServerConfig(releases=(), ssl_dir=self.base / "ssl",
                                   kernel_store=self.store)
        self.sandbox = Sandbox(home=self.base / "home", systemtap_dir=self.base / "s")
        self.events = Events()
        self.log = Logger(observer=self.events)

    def test_the_host_alone_is_nothing_to_choose_from(self) -> None:
        self.assertEqual(server_toolchains(self.config, self.sandbox, self.log), [])

    def test_a_root_whose_translator_does_not_run_and_a_damaged_one(self) -> None:
        # Its stap is a shell script, and the root has no shell.
        make_root(toolchains_directory(self.store) / "forky")
        broken = make_root(toolchains_directory(self.store) / "trixie")
        (broken / "manifest.json").unlink()
        self.assertEqual(server_toolchains(self.config, self.sandbox, self.log), [])
        [line] = self.events.matching("Not using toolchain forky")
        self.assertIn("its translator does not run in the sandbox", line)
        [line] = self.events.matching("Not using toolchain trixie")
        self.assertIn("no manifest", line)

    def test_without_the_sandbox_toolchains_are_not_used(self) -> None:
        make_root(toolchains_directory(self.store) / "forky")
        self.assertEqual(server_toolchains(self.config, None, self.log), [])
        self.assertEqual(len(self.events.matching("--no-sandbox")), 1)

    def test_the_hosts_version(self) -> None:
        require_program("stap")
        self.assertEqual(host_translator("stap").translator, "4.8")
