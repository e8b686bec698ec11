"""The client policy with the real client: each refused client reads why."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.helpers.realclient import HELLO, RealClientMixin


class PolicyTests(RealClientMixin, TestCase):
    async def compile(self, server, *arguments: str):  # type: ignore[no-untyped-def]
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, *arguments, "-p4", "-e", HELLO)
        return client, err.decode(), code

    async def test_guru_mode_and_privilege_levels(self) -> None:
        server = self.own_server("--refuse-guru", "--privileges", "stapusr,stapsys")
        client, err, code = await self.compile(server, "-g")
        self.assertEqual(code, 1)
        self.assertIn("Server: This server does not compile guru mode (-g) scripts.", err)
        self.assertEqual(client.modules(), [])
        client, err, code = await self.compile(server)
        self.assertEqual(code, 1)
        self.assertIn("Server: This server does not compile for privilege level stapdev; it "
                      "accepts stapusr, stapsys (its --privileges).", err)
        self.assertEqual(client.modules(), [])
        client, err, code = await self.compile(server, "--privilege=stapusr")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(client.modules()), 2)  # the module and its signature
        self.assertIn("Refusing the request from 127.0.0.1:", server.log())

    async def test_allow_list(self) -> None:
        outside = self.own_server("--allow", "192.0.2.0/24, 2001:db8::/32")
        client, err, code = await self.compile(outside)
        self.assertEqual(code, 1)
        self.assertIn("Server: This server does not accept requests from 127.0.0.1 "
                      "(its --allow list).", err)
        self.assertEqual(client.modules(), [])
        self.assertRegex(outside.log(), r"Refusing 127\.0\.0\.1:\d+: not in the --allow list")
        self.assertNotIn("Options passed from the client", outside.log())
        inside = self.own_server("--allow", "192.0.2.0/24", "--allow", "127.0.0.0/8")
        client, err, code = await self.compile(inside)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(client.modules()), 1)
