from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import TestCase

from stapsrv import tap
from stapsrv.cmdline import ServerOption
from stapsrv.config import ServerConfig
from stapsrv.serverlog import LogFileService
from stapsrv.service import CompileServerService


class OptionsTests(TestCase):
    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)

    def parse(self, *argv: str) -> ServerConfig:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options.to_config()

    def test_defaults_match_48(self) -> None:
        config = self.parse()
        self.assertEqual(config.releases, (os.uname().release,))
        self.assertEqual((config.port, config.listen, config.max_request_size,
                          config.max_compressed_request, config.max_threads,
                          config.keep_temporary, config.log_file),
                         (0, "::", 50000, 5000, os.cpu_count(), False, None))

    def test_everything(self) -> None:
        config = self.parse(
            "-r", "6.1.0-56-amd64", "-r", "6.1.0-55-amd64", "-a", "x86_64", "-I", "/t",
            "-D", "A=1", "-B", "V=1", "-R", "/rt", "--port", "4711", "--listen", "::1",
            "--ssl", "/ssl", "--log", "/l", "--max-threads", "0", "--max-request-size", "10",
            "--max-compressed-request", "20", "-k")
        self.assertEqual(config.releases[1:], ("6.1.0-56-amd64", "6.1.0-55-amd64"))
        self.assertEqual(config.server_options, (
            ServerOption("-a", "x86_64"), ServerOption("-I", "/t"), ServerOption("-D", "A=1"),
            ServerOption("-B", "V=1"), ServerOption("-R", "/rt")))
        self.assertEqual((config.runtime, config.port, config.listen, config.ssl_dir,
                          config.log_file, config.max_threads, config.concurrency,
                          config.max_request_size, config.max_compressed_request,
                          config.keep_temporary),
                         ("/rt", 4711, "::1", Path("/ssl"), Path("/l"), 0, 1, 10, 20, True))

    def test_build_tree_release(self) -> None:
        tree = Path(self.mktemp())
        (tree / "include" / "config").mkdir(parents=True)
        (tree / "include" / "config" / "kernel.release").write_text("6.1.0-99-amd64\n")
        self.assertIn("6.1.0-99-amd64", self.parse("-r", str(tree.absolute())).releases)

    def test_bad_numbers(self) -> None:
        for argv in (["--port", "70000"], ["--port", "x"], ["--max-threads", "-1"],
                     ["--max-request-size", "0"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_root_refused(self) -> None:
        self.patch(os, "geteuid", lambda: 0)
        self.patch(os, "environ", {})
        with self.assertRaises(usage.UsageError) as caught:
            self.parse()
        self.assertIn("For security reasons", str(caught.exception))

    def test_service_tree(self) -> None:
        options = tap.Options()
        options.parseOptions(["--log", "/tmp/x.log"])
        top = tap.makeService(options)
        children = list(top)
        self.assertIsInstance(children[0], LogFileService)
        self.assertIsInstance(children[1], CompileServerService)
        self.assertFalse(top.running)
