from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import TestCase

from stapsrv.app import tap
from stapsrv.app.accepts import AcceptErrorLog
from stapsrv.app.logs import LogFileService, ReopenOnSighup
from stapsrv.app.metrics import MetricsService
from stapsrv.app.notify import SystemdNotifier
from stapsrv.app.publish import PublisherService
from stapsrv.app.service import CompileServerService
from stapsrv.app.shutdown import CleanExitOnSignal
from stapsrv.config.secret import create_secret
from stapsrv.config.values import ServerConfig
from stapsrv.core.cmdline import ServerOption


class OptionsTests(TestCase):
    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        self.patch(tap.Options, "optParameters", [
            [name, short, "::" if name == "listen" else default, *rest]
            for name, short, default, *rest in tap.Options.optParameters])
        self.secret = Path(self.mktemp()).absolute()
        create_secret(self.secret)

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

    def test_robustness_and_cache_options(self) -> None:
        from stapsrv.config.values import TranslatorLimits
        config = self.parse()
        self.assertEqual((config.max_peer_connections, config.descriptor_reserve), (None, 128))
        config = self.parse("--max-peer-connections", "16", "--descriptor-reserve", "300")
        self.assertEqual((config.max_peer_connections, config.descriptor_reserve), (16, 300))
        self.assertRaises(usage.UsageError, self.parse, "--descriptor-reserve", "0")
        self.assertRaises(usage.UsageError, self.parse, "--max-peer-connections", "-1")
        config = self.parse("--max-fetches", "4", "--peer-fetches", "0")
        self.assertEqual((config.max_fetches, config.peer_fetches), (4, 0))
        self.assertEqual((self.parse().max_fetches, self.parse().peer_fetches), (2, 1))
        self.assertRaises(usage.UsageError, self.parse, "--max-fetches", "0")
        self.assertRaises(usage.UsageError, self.parse, "--peer-fetches", "-1")
        config = self.parse()
        self.assertEqual((config.request_timeout, config.compile_timeout, config.limits,
                          config.cache_enabled, config.cache_dir, config.cache_size,
                          config.fleet_cache),
                         (30.0, 900.0, TranslatorLimits(), True, None, 512 << 20, None))
        config = self.parse("--request-timeout", "3", "--compile-timeout", "0",
                            "--cpu-limit", "60", "--memory-limit", "2048",
                            "--file-size-limit", "100", "--process-limit", "500",
                            "--no-cache", "--cache-dir", "/c", "--cache-size", "64",
                            "--fleet-cache", "redis://127.0.0.1:6379/0",
                            "--fleet-secret", str(self.secret),
                            "--counters-file", "/run/x")
        self.assertEqual((config.request_timeout, config.compile_timeout, config.limits,
                          config.cache_enabled, config.cache_dir, config.cache_size,
                          config.fleet_cache, config.fleet_secret, config.counters_file),
                         (3.0, 0.0, TranslatorLimits(60, 2048 << 20, 100 << 20, 500), False,
                          Path("/c"), 64 << 20, "redis://127.0.0.1:6379/0", self.secret,
                          Path("/run/x")))
        for url in ("localhost:6379", "http://x/", "redis://"):
            self.assertRaises(usage.UsageError, self.parse, "--fleet-cache", url,
                              "--fleet-secret", str(self.secret))
        self.assertEqual(config.limits.prlimit_flags(),
                         ["--cpu=60:60", f"--as={2048 << 20}:{2048 << 20}",
                          f"--fsize={100 << 20}:{100 << 20}", "--nproc=500:500"])

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

    def test_endpoint_and_metrics(self) -> None:
        config = self.parse("--endpoint", "haproxy:tcp:5000:interface=10.0.0.5",
                            "--metrics", "tcp:9642")
        self.assertEqual((config.listen_description, config.proxied, config.metrics),
                         ("haproxy:tcp:5000:interface=10.0.0.5", True, "tcp:9642"))
        self.assertEqual(self.parse("--port", "4711").listen_description,
                         r"tcp:port=4711:interface=\:\::backlog=1024")
        with self.assertRaisesRegex(usage.UsageError, "adds TLS itself"):
            self.parse("--endpoint", "ssl:5000")

    def test_proxy_from(self) -> None:
        config = self.parse("--endpoint", "haproxy:tcp:5000", "--proxy-from", "10.0.0.0/8",
                            "--proxy-from", "2001:db8::/32,192.0.2.1")
        self.assertEqual(config.proxy_from, ("10.0.0.0/8", "2001:db8::/32", "192.0.2.1/32"))
        self.assertEqual(self.parse("--endpoint", "haproxy:tcp:5000").proxy_from,
                         ("127.0.0.0/8", "::1/128"))
        with self.assertRaisesRegex(usage.UsageError,
                                    "--proxy-from 10.0.0.0/99: not an address or network"):
            self.parse("--endpoint", "haproxy:tcp:5000", "--proxy-from", "10.0.0.0/99")
        with self.assertRaisesRegex(usage.UsageError, "only a haproxy: --endpoint"):
            self.parse("--proxy-from", "10.0.0.0/8")

    def test_metrics_listener_follows_its_server(self) -> None:
        options = tap.Options()
        options.parseOptions(["--metrics", "tcp:0:interface=127.0.0.1"])
        kinds = [type(child) for child in tap.makeService(options)]
        self.assertEqual(kinds.index(MetricsService), kinds.index(CompileServerService) + 1)
        options = tap.Options()
        options.parseOptions([])
        self.assertNotIn(MetricsService, [type(child) for child in tap.makeService(options)])

    def test_service_tree(self) -> None:
        options = tap.Options()
        options.parseOptions(["--log", "/tmp/x.log"])
        top = tap.makeService(options)
        children = list(top)
        # The log first, the SIGHUP handler before any server listens, then
        # the server and its publisher.
        self.assertEqual([type(child) for child in children][:3],
                         [LogFileService, ReopenOnSighup, CompileServerService])
        self.assertFalse(top.running)


class ConfigFileTests(TestCase):
    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        self.base = Path(self.mktemp()).absolute()
        (self.base / "conf.d").mkdir(parents=True)
        self.global_file = self.base / "global"
        self.global_file.write_text(f"CONFIG_PATH={self.base / 'conf.d'}\n"
                                    f"LOG_FILE={self.base / 'log'}\n")

    def services(self) -> list[object]:
        options = tap.Options()
        options.parseOptions(["--config", str(self.global_file)])
        return list(tap.makeService(options))

    def test_every_configured_server_with_its_own_log(self) -> None:
        (self.base / "conf.d" / "a.conf").write_text(
            "NICKNAME=alpha\nPORT=4000\nINCLUDE=/t\nDEFINE+=X=1\nMAXTHREADS=0\n")
        (self.base / "conf.d" / "b.conf").write_text(f"LOG={self.base / 'b.log'}\nRELEASE=r9\n")
        logs = [s for s in self.services() if isinstance(s, LogFileService)]
        servers = [s for s in self.services() if isinstance(s, CompileServerService)]
        self.assertEqual({(l.path, l.namespaces) for l in logs}, {
            (self.base / "log", frozenset({"stapsrv.alpha"})),
            (self.base / "b.log", frozenset({"stapsrv.b"}))})
        alpha, b = (s.config for s in servers)
        self.assertEqual((alpha.port, alpha.max_threads, alpha.server_options),
                         (4000, 0, (ServerOption("-I", "/t"), ServerOption("-D", "X=1"))))
        self.assertEqual(b.releases, (os.uname().release, "r9"))

    def test_the_servers_of_a_process_share_one_admission(self) -> None:
        """Descriptors are the process's: one reserve (the largest) for
        all its servers; each keeps its own per-peer cap."""
        (self.base / "conf.d" / "a.conf").write_text("DESCRIPTOR_RESERVE=64\n")
        (self.base / "conf.d" / "b.conf").write_text(
            "DESCRIPTOR_RESERVE=200\nMAX_PEER_CONNECTIONS=5\n")
        a, b = [s for s in self.services() if isinstance(s, CompileServerService)]
        self.assertIsNotNone(a.admission)
        self.assertIs(a.admission, b.admission)
        assert a.admission is not None
        self.assertEqual(a.admission.reserve, 200)
        self.assertEqual((a.config.max_peer_connections, b.config.max_peer_connections),
                         (None, 5))

    def test_our_variables(self) -> None:
        from stapsrv.config.values import TranslatorLimits
        secret = self.base / "secret"
        create_secret(secret)
        (self.base / "conf.d" / "a.conf").write_text(
            "REQUEST_TIMEOUT=5\nCOMPILE_TIMEOUT=60\nCPU_LIMIT=30\nMEMORY_LIMIT=1024\n"
            "FILE_SIZE_LIMIT=50\nPROCESS_LIMIT=200\nCACHE=no\nCACHE_DIR=/c\n"
            f"CACHE_SIZE=10\nFLEET_CACHE=redis://10.0.0.5:6379/1\nFLEET_SECRET={secret}\n"
            "ENDPOINT=systemd:domain=INET:index=0\nMETRICS=tcp:9642\n")
        [server] = [s for s in self.services() if isinstance(s, CompileServerService)]
        config = server.config
        self.assertEqual((config.endpoint, config.metrics),
                         ("systemd:domain=INET:index=0", "tcp:9642"))
        self.assertEqual((config.request_timeout, config.compile_timeout, config.limits,
                          config.cache_enabled, config.cache_dir, config.cache_size,
                          config.fleet_cache),
                         (5.0, 60.0, TranslatorLimits(30, 1024 << 20, 50 << 20, 200), False,
                          Path("/c"), 10 << 20, "redis://10.0.0.5:6379/1"))
        (self.base / "conf.d" / "a.conf").write_text("CACHE=maybe\n")
        self.assertRaises(usage.UsageError, self.services)
        (self.base / "conf.d" / "a.conf").write_text("CPU_LIMIT=0\n")
        self.assertRaises(usage.UsageError, self.services)

    def test_no_configured_server_means_the_default_one(self) -> None:
        [log, reopen, server, publisher, accepts, notifier, clean_exit] = self.services()
        self.assertIsInstance(accepts, AcceptErrorLog)
        self.assertIsInstance(reopen, ReopenOnSighup)
        self.assertIsInstance(notifier, SystemdNotifier, "after every server: READY=1 "
                              "means all of them listen")
        self.assertIsInstance(clean_exit, CleanExitOnSignal)
        self.assertIsInstance(publisher, PublisherService)
        self.assertEqual(server.config.releases, (os.uname().release,))
        self.assertEqual(log.path, self.base / "log")

    def test_bad_values_are_usage_errors(self) -> None:
        (self.base / "conf.d" / "a.conf").write_text("PORT=http\n")
        self.assertRaises(usage.UsageError, self.services)
        (self.base / "conf.d" / "a.conf").write_text("BOGUS=1\n")
        self.assertRaises(usage.UsageError, self.services)


class RoutingTests(TestCase):
    def test_each_log_gets_its_servers_lines(self) -> None:
        from stapsrv.app.logs import format_line
        event = {"log_namespace": "stapsrv.alpha", "log_format": "hello", "log_time": 0}
        self.assertIsNotNone(format_line(event, frozenset({"stapsrv.alpha"})))
        self.assertIsNone(format_line(event, frozenset({"stapsrv.b"})))
        shared = dict(event, log_namespace="stapsrv")
        self.assertIsNotNone(format_line(shared, frozenset({"stapsrv.b"})))
        self.assertIsNone(format_line(dict(event, log_namespace="twisted"), None))
