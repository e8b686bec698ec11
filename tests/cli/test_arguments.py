from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.arguments import ArgumentError, SpecWords, parse


class ParseTests(TestCase):
    def test_one_server(self) -> None:
        invocation = parse(["start", "-a", "x86_64", "-r", "r1", "-rr2", "-I", "/t", "-k",
                            "--port", "5000", "--log=/l", "-c", "/c1", "-c", "/c2"])
        self.assertEqual(invocation.specs, [SpecWords(changes=[
            ("-a", "x86_64"), ("-r", "r1"), ("-r", "r2"), ("-I", "/t")])])
        self.assertEqual(invocation.distributed["port"], ["5000"])
        self.assertEqual(invocation.distributed["log"], ["/l"])
        self.assertEqual(invocation.config_files, [Path("/c2")])
        self.assertTrue(invocation.keep)

    def test_json_and_the_fleet_options(self) -> None:
        invocation = parse(["status", "--json"])
        self.assertTrue(invocation.json)
        self.assertFalse(parse(["status"]).json)
        invocation = parse(["start", "--endpoint", "haproxy:tcp:5000", "--metrics=tcp:9642"])
        self.assertEqual(invocation.distributed["endpoint"], ["haproxy:tcp:5000"])
        self.assertEqual(invocation.distributed["metrics"], ["tcp:9642"])
        invocation = parse(["start", "-n", "a", "-n", "b", "--endpoint", "haproxy:tcp:5000",
                            "--endpoint", "haproxy:tcp:5001", "--proxy-from", "10.0.0.2",
                            "--proxy-from=10.0.0.3,10.0.0.4"])
        self.assertEqual(invocation.distributed["proxy-from"], ["10.0.0.2", "10.0.0.3,10.0.0.4"])

    def test_several_servers(self) -> None:
        invocation = parse(["start", "-n", "a", "-a", "i386", "-n", "b", "-p", "42", "-r", "x",
                            "--port", "1", "--port", "2"])
        self.assertEqual(invocation.specs, [
            SpecWords("a", None, [("-a", "i386")]), SpecWords("b"),
            SpecWords(None, "42", [("-r", "x")])])
        self.assertEqual(invocation.distributed["port"], ["1", "2"])

    def test_options_before_the_first_nickname_belong_to_it(self) -> None:
        invocation = parse(["start", "-r", "x", "-n", "new"])
        self.assertEqual(invocation.specs, [SpecWords("new", None, [("-r", "x")])])

    def test_distributed_options_alone_name_no_server(self) -> None:
        self.assertFalse(parse(["stop", "--port", "5000", "-k"]).explicit)

    def test_errors(self) -> None:
        for words in (["start", "--bogus"], ["start", "stray"], ["start", "-kP"],
                      ["start", "-x"], ["start", "--port"], ["start", "-r"]):
            self.assertRaises(ArgumentError, parse, words)
