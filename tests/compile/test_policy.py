"""The administrator's client policy: networks, guru mode, privilege levels."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.compile.policy import Policy, PolicyError, parse_networks, parse_privileges
from stapsrv.core.cmdline import Privilege


class NetworkTests(TestCase):
    def test_everyone_without_a_list(self) -> None:
        self.assertTrue(Policy().admits("203.0.113.9"))

    def test_addresses_and_networks(self) -> None:
        policy = Policy(parse_networks(["127.0.0.0/8", "2001:db8::/32", "192.0.2.7"]))
        for host in ("127.0.0.1", "127.9.9.9", "2001:db8::1", "192.0.2.7",
                     "::ffff:127.0.0.1", "2001:db8::5%eth0"):
            self.assertTrue(policy.admits(host), host)
        for host in ("192.0.2.8", "10.0.0.1", "::1", "2001:db9::1", "::ffff:10.0.0.1",
                     "garbage", ""):
            self.assertFalse(policy.admits(host), host)

    def test_bad_networks_are_named(self) -> None:
        with self.assertRaises(PolicyError) as caught:
            parse_networks(["10.0.0.0/8", "10.0.0.0/33"])
        self.assertIn("--allow 10.0.0.0/33", str(caught.exception))

    def test_refusal_names_the_client(self) -> None:
        self.assertEqual(Policy().peer_refusal("192.0.2.1"),
                         "Server: This server does not accept requests from 192.0.2.1 "
                         "(its --allow list).")


class RequestTests(TestCase):
    def test_defaults_refuse_nothing(self) -> None:
        self.assertIsNone(Policy().request_refusal(["-g", "-p4"], Privilege.STAPDEV))

    def test_guru_mode_as_getopt_sees_it(self) -> None:
        policy = Policy(refuse_guru=True)
        for arguments in (["-g", "-p4"], ["-vgp4"], ["-p4", "-g"], ["-e", "x", "-g"]):
            self.assertEqual(policy.request_refusal(arguments, Privilege.STAPDEV),
                             "Server: This server does not compile guru mode (-g) scripts.",
                             arguments)
        for arguments in (["-p4"], ["-eprobe begin { println(\"-g\") }"], ["-p4", "--", "-g"],
                          ["-D", "-g"], ["-pg"]):
            self.assertIsNone(policy.request_refusal(arguments, Privilege.STAPDEV), arguments)

    def test_privilege_levels(self) -> None:
        policy = Policy(privileges=parse_privileges("stapsys, stapusr"))
        self.assertEqual(policy.privileges, ("stapusr", "stapsys"))
        self.assertIsNone(policy.request_refusal([], Privilege.STAPUSR))
        self.assertEqual(policy.request_refusal([], Privilege.STAPDEV),
                         "Server: This server does not compile for privilege level stapdev; "
                         "it accepts stapusr, stapsys (its --privileges).")

    def test_bad_privilege_lists(self) -> None:
        for value in ("", "root", "stapusr,,root", " , "):
            self.assertRaises(PolicyError, parse_privileges, value)
