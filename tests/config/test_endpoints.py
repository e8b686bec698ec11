from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.config.convert import SettingsError, server_config
from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, EndpointError, check, proxied, shorthand
from stapsrv.config.values import ServerConfig


class EndpointTests(TestCase):
    def test_shorthand_escapes_an_ipv6_interface(self) -> None:
        self.assertEqual(shorthand(7999, "::", 50), r"tcp:port=7999:interface=\:\::backlog=50")
        self.assertEqual(shorthand(0, "127.0.0.1", backlog=5),
                         "tcp:port=0:interface=127.0.0.1:backlog=5")

    def test_stream_kinds_are_accepted(self) -> None:
        for text in ("tcp:0", "tcp6:port=0:interface=\\:\\:1", "haproxy:tcp:4000",
                     "haproxy:systemd:domain=INET:index=0", "systemd:domain=INET:index=0"):
            self.assertEqual(check(text), text)

    def test_tls_and_other_kinds_are_refused_with_a_reason(self) -> None:
        with self.assertRaisesRegex(EndpointError, "adds TLS itself"):
            check("ssl:4000")
        with self.assertRaisesRegex(EndpointError, "haproxy: must wrap"):
            check("haproxy:unix:/tmp/x")
        with self.assertRaisesRegex(EndpointError, "not a tcp:"):
            check("unix:/tmp/x")
        with self.assertRaisesRegex(EndpointError, "not a tcp:"):
            check("tcp")

    def test_proxied(self) -> None:
        self.assertTrue(proxied("haproxy:tcp:0"))
        self.assertTrue(proxied("HAPROXY:tcp:0"))
        self.assertFalse(proxied("tcp:0"))

    def test_config_listens_on_the_endpoint_or_the_shorthand(self) -> None:
        plain = ServerConfig(releases=("r",), ssl_dir=Path("/x"), port=5000, listen="127.0.0.1")
        self.assertEqual(plain.listen_description, "tcp:port=5000:interface=127.0.0.1:backlog=1024")
        self.assertFalse(plain.proxied)
        behind = server_config(port=5000, endpoint="haproxy:tcp:6000:interface=127.0.0.1")
        self.assertEqual(behind.listen_description, "haproxy:tcp:6000:interface=127.0.0.1")
        self.assertTrue(behind.proxied)

    def test_bad_endpoint_is_a_settings_error(self) -> None:
        with self.assertRaisesRegex(SettingsError, "--metrics 'ssl:1'"):
            server_config(metrics="ssl:1")


class ProxyFromTests(TestCase):
    """``--proxy-from``: where a PROXY header is believed from."""

    BEHIND = "haproxy:tcp:6000:interface=127.0.0.1"

    def test_default_is_this_host_only(self) -> None:
        self.assertEqual(server_config(endpoint=self.BEHIND).proxy_from,
                         ("127.0.0.0/8", "::1/128"))
        self.assertEqual(ServerConfig(releases=("r",), ssl_dir=Path("/x")).proxy_from,
                         DEFAULT_PROXY_FROM)

    def test_words_separated_by_commas_or_blanks_and_repeated(self) -> None:
        config = server_config(endpoint=self.BEHIND,
                               proxy_from=["10.0.0.5, 192.0.2.0/24", "2001:db8::1  10.1.2.3/8"])
        self.assertEqual(config.proxy_from,
                         ("10.0.0.5/32", "192.0.2.0/24", "2001:db8::1/128", "10.0.0.0/8"))

    def test_bad_network_is_a_settings_error_naming_it(self) -> None:
        for bad in ("10.0.0.0/33", "proxy.example", "300.1.1.1"):
            with self.assertRaisesRegex(SettingsError,
                                        f"--proxy-from {bad}: not an address or network"):
                server_config(endpoint=self.BEHIND, proxy_from=[f"127.0.0.1,{bad}"])

    def test_only_a_haproxy_endpoint_takes_it(self) -> None:
        for endpoint in (None, "tcp:6000", "systemd:domain=INET:index=0"):
            with self.assertRaisesRegex(SettingsError, "only a haproxy: --endpoint reads"):
                server_config(endpoint=endpoint, proxy_from=["10.0.0.0/8"])
        # Empty values are no setting at all (PROXY_FROM= in a file).
        self.assertEqual(server_config(proxy_from=["", " "]).proxy_from, DEFAULT_PROXY_FROM)
