"""One conversion to a ServerConfig (stapsrv.config.convert): the twistd
options and a configuration file that say the same give the same config."""

from __future__ import annotations

import os
from pathlib import Path

from attrs import evolve
from twisted.python import usage
from twisted.trial.unittest import TestCase

from stapsrv.app import tap
from stapsrv.config.convert import SettingsError, server_config, settings_config
from stapsrv.config.files import GlobalConfig, read_server_file
from stapsrv.config.secret import create_secret
from stapsrv.core.aptsources import DEBIAN_MIRROR, AptSuite


class ConvertCase(TestCase):
    """A scratch directory, as a user that is not root."""

    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()


class ConvertTests(ConvertCase):

    def test_options_and_file_agree(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text(
            f"RELEASE=6.1.0-56-amd64\nARCH=x86_64\nINCLUDE=/t\nDEFINE=A=1\nPORT=4711\n"
            f"SSL={self.base / 'ssl'}\nLOG={self.base / 'log'}\nMAXTHREADS=3\n"
            f"MAXREQSIZE=10\nMAXCOMPRESSEDREQ=20\nREQUEST_TIMEOUT=5\nCOMPILE_TIMEOUT=60\n"
            f"CPU_LIMIT=30\nMEMORY_LIMIT=1024\nCACHE=no\nCACHE_DIR=/c\nCACHE_SIZE=10\n"
            f"SANDBOX=off\nMAX_PEER_CONNECTIONS=0\nDESCRIPTOR_RESERVE=64\n")
        from_file = settings_config(read_server_file(conf), GlobalConfig())
        options = tap.Options()
        options.parseOptions([
            "-r", "6.1.0-56-amd64", "-a", "x86_64", "-I", "/t", "-D", "A=1",
            "--port", "4711", "--ssl", str(self.base / "ssl"), "--log", str(self.base / "log"),
            "--max-threads", "3", "--max-request-size", "10", "--max-compressed-request", "20",
            "--request-timeout", "5", "--compile-timeout", "60", "--cpu-limit", "30",
            "--memory-limit", "1024", "--no-cache", "--cache-dir", "/c", "--cache-size", "10",
            "--no-sandbox", "--max-peer-connections", "0", "--descriptor-reserve", "64"])
        self.assertEqual(options.to_config(), from_file)
        self.assertFalse(from_file.sandbox)
        self.assertEqual((from_file.max_peer_connections, from_file.descriptor_reserve), (0, 64))

    def test_sandbox_is_on_unless_switched_off(self) -> None:
        self.assertTrue(server_config().sandbox)
        conf = self.base / "a.conf"
        for value, expected in (("", True), ("yes", True), ("NO", False), ("0", False)):
            conf.write_text(f"SANDBOX={value}\n")
            self.assertEqual(settings_config(read_server_file(conf), GlobalConfig()).sandbox,
                             expected, value)
        conf.write_text("SANDBOX=maybe\n")
        with self.assertRaises(SettingsError) as caught:
            settings_config(read_server_file(conf), GlobalConfig())
        self.assertEqual(str(caught.exception), "SANDBOX=maybe is not yes or no")

    def test_defaults(self) -> None:
        config = server_config()
        self.assertEqual((config.max_peer_connections, config.descriptor_reserve), (None, 128))
        self.assertEqual(config.releases, (os.uname().release,))
        self.assertEqual(config.max_threads, os.cpu_count() or 1)
        self.assertEqual(evolve(config, listen="::"), server_config(listen="::"))

    def test_fleet_cache_errors_name_their_source(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text("FLEET_CACHE=http://x\n")
        with self.assertRaises(SettingsError) as caught:
            settings_config(read_server_file(conf), GlobalConfig())
        self.assertTrue(str(caught.exception).startswith("FLEET_CACHE: "))

    def fleet_error(self, text: str) -> str:
        conf = self.base / "a.conf"
        conf.write_text(text)
        with self.assertRaises(SettingsError) as caught:
            settings_config(read_server_file(conf), GlobalConfig())
        return str(caught.exception)

    def test_a_fleet_cache_needs_a_secret(self) -> None:
        """The safe choice: no fleet cache without authenticated entries."""
        message = self.fleet_error("FLEET_CACHE=redis://127.0.0.1/0\n")
        self.assertTrue(message.startswith("FLEET_SECRET: a fleet cache needs"), message)
        self.assertIn("python3 -m stapsrv.cli.fleet secret FILE", message)
        options = tap.Options()
        options.parseOptions(["--fleet-cache", "redis://127.0.0.1/0"])
        with self.assertRaises(usage.UsageError) as caught:
            options.to_config()
        self.assertTrue(str(caught.exception).startswith("--fleet-secret: a fleet cache needs"))

    def test_secret_and_password_files_are_checked(self) -> None:
        secret = self.base / "secret"
        missing = self.fleet_error(f"FLEET_CACHE=redis://h/0\nFLEET_SECRET={secret}\n")
        self.assertEqual(missing, f"FLEET_SECRET: cannot read the fleet secret {secret}: "
                                  "No such file or directory")
        create_secret(secret)
        secret.chmod(0o640)
        self.assertIn("chmod 600", self.fleet_error(
            f"FLEET_CACHE=redis://h/0\nFLEET_SECRET={secret}\n"))
        secret.chmod(0o600)
        password = self.base / "password"
        password.write_text("")
        password.chmod(0o600)
        self.assertEqual(self.fleet_error(
            f"FLEET_CACHE=redis://h/0\nFLEET_SECRET={secret}\nFLEET_PASSWORD_FILE={password}\n"),
            f"FLEET_PASSWORD_FILE: the Redis password file {password} is empty")
        password.write_text("pw\n")
        config = settings_config(read_server_file(self.base / "a.conf"), GlobalConfig())
        self.assertEqual((config.fleet_secret, config.fleet_password_file), (secret, password))

    def test_no_password_in_the_url(self) -> None:
        """It would show in ps and in the status file: files only."""
        for url in ("redis://:pw@h/0", "rediss://user:pw@h/0", "redis://h/0?password=pw",
                    "http://:pw@h/"):
            message = self.fleet_error(f"FLEET_CACHE={url}\n")
            self.assertTrue(message.startswith("FLEET_CACHE: the fleet cache "), message)
            self.assertNotIn("pw", message.replace("password", ""))
            if url.startswith("redis"):
                self.assertIn("URL holds a password", message)
                self.assertIn("--fleet-password-file", message)

    def test_kernel_store_options_and_file_agree(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text(f"LOG={self.base / 'log'}\nFETCH_KERNELS=no\n"
                        "FETCH_RELEASES=6.1.0-*-amd64, 6.1.0-*-rt-amd64\n"
                        f"KERNEL_STORE={self.base / 'kernels'}\nKERNEL_STORE_SIZE=300\n"
                        "FETCH_DEBUGINFO=yes\nMAX_FETCHES=3\nPEER_FETCHES=0\n")
        from_file = settings_config(read_server_file(conf), GlobalConfig())
        options = tap.Options()
        options.parseOptions([
            "--log", str(self.base / "log"), "--no-fetch",
            "--fetch-releases", "6.1.0-*-amd64", "--fetch-releases", "6.1.0-*-rt-amd64",
            "--kernel-store", str(self.base / "kernels"), "--kernel-store-size", "300",
            "--fetch-debuginfo", "--max-fetches", "3", "--peer-fetches", "0"])
        self.assertEqual(options.to_config(), from_file)
        self.assertEqual((from_file.max_fetches, from_file.peer_fetches), (3, 0))
        self.assertEqual((from_file.fetch_kernels, from_file.fetch_patterns,
                          from_file.kernel_store, from_file.kernel_store_size,
                          from_file.fetch_symbols, from_file.fetch_debuginfo),
                         (False, ("6.1.0-*-amd64", "6.1.0-*-rt-amd64"), self.base / "kernels",
                          300 << 20, True, True))
        defaults = server_config()
        self.assertEqual((defaults.fetch_kernels, defaults.fetch_patterns,
                          defaults.fetch_symbols, defaults.fetch_debuginfo),
                         (True, (), True, False))
        self.assertEqual((defaults.max_fetches, defaults.peer_fetches), (2, 1))
        conf.write_text("MAX_FETCHES=0\n")
        self.assertRaises(SettingsError, settings_config, read_server_file(conf),
                          GlobalConfig())
        conf.write_text("FETCH_SYMBOLS=no\n")
        without = settings_config(read_server_file(conf), GlobalConfig())
        options = tap.Options()
        options.parseOptions(["--log", str(self.base / "log"), "--no-fetch-symbols"])
        self.assertFalse(without.fetch_symbols)
        self.assertEqual(options.to_config().fetch_symbols, without.fetch_symbols)
        with self.assertRaises(SettingsError):
            server_config(fetch_releases=["6.1.0-*-amd64;rm"])


    def test_fetch_suites_options_and_file_agree(self) -> None:  # --fetch-suites (#27)
        conf = self.base / "a.conf"
        conf.write_text(f"LOG={self.base / 'log'}\n"
                        "FETCH_SUITES=bookworm-backports, trixie forky=http://m.example/debian\n")
        from_file = settings_config(read_server_file(conf), GlobalConfig())
        options = tap.Options()
        options.parseOptions(["--log", str(self.base / "log"),
                              "--fetch-suites", "bookworm-backports,trixie",
                              "--fetch-suites", "forky=http://m.example/debian"])
        self.assertEqual(options.to_config(), from_file)
        self.assertEqual(from_file.fetch_suites, (
            AptSuite("bookworm-backports", DEBIAN_MIRROR), AptSuite("trixie", DEBIAN_MIRROR),
            AptSuite("forky", "http://m.example/debian")))
        self.assertEqual(server_config().fetch_suites, ())
        for bad in ("Trixie", "trixie=http://x/[trusted=yes]", "trixie=ftp://x"):
            with self.assertRaises(SettingsError, msg=bad) as raised:
                server_config(fetch_suites=[bad])
            self.assertTrue(str(raised.exception).startswith("--fetch-suites: "))


class ProxyFromFileTests(ConvertCase):
    def test_options_and_file_agree(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text(f"SSL={self.base / 'ssl'}\nLOG={self.base / 'log'}\n"
                        "ENDPOINT=haproxy:tcp:5000\nPROXY_FROM=10.0.0.0/8, 192.0.2.7\n")
        from_file = settings_config(read_server_file(conf), GlobalConfig())
        options = tap.Options()
        options.parseOptions(["--ssl", str(self.base / "ssl"), "--log", str(self.base / "log"),
                              "--endpoint", "haproxy:tcp:5000", "--proxy-from", "10.0.0.0/8",
                              "--proxy-from", "192.0.2.7"])
        self.assertEqual(options.to_config(), from_file)
        self.assertEqual(from_file.proxy_from, ("10.0.0.0/8", "192.0.2.7/32"))

    def test_bad_value_in_a_file_is_refused(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text("ENDPOINT=haproxy:tcp:5000\nPROXY_FROM=10.0.0.0/40\n")
        with self.assertRaisesRegex(SettingsError, "--proxy-from 10.0.0.0/40: not an address"):
            settings_config(read_server_file(conf), GlobalConfig())
