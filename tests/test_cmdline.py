from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.cmdline import (
    Privilege,
    ServerOption,
    requested_privilege,
    scan_options,
    translator_argv,
    without_sign_module,
)
from tests.vectors import arguments_of, captured_requests

TMP = "/tmp/stap-server.K78dZt/response/stap000000"


class TranslatorArgvTests(TestCase):
    def test_verified_command_line(self) -> None:
        """The command line 4.8 logged for the -p2 sample (protocol.md 5.3)."""
        arguments = arguments_of(captured_requests()["req-p2-scriptfile-tapset-args"])
        argv = translator_argv("/usr/bin/stap", "6.1.0-56-amd64", [], TMP, arguments)
        self.assertEqual(" ".join(argv), (
            "/usr/bin/stap -r6.1.0-56-amd64 --tmpdir=" + TMP + " --client-options "
            "script/home/user/proj/hello.stp -I tapset/home/user/proj/mytapset -v "
            "-r6.1.0-56-amd64 -p2 -DFOO=1 -- world"))

    def test_every_capture_is_passed_verbatim(self) -> None:
        for name, body in captured_requests().items():
            arguments = arguments_of(body)
            argv = translator_argv("/usr/bin/stap", "6.1.0-56-amd64", [], TMP, arguments)
            self.assertEqual(argv[:4], ["/usr/bin/stap", "-r6.1.0-56-amd64",
                                        "--tmpdir=" + TMP, "--client-options"], name)
            self.assertEqual(argv[4:], arguments, name)

    def test_server_options_come_first_in_order(self) -> None:
        options = [ServerOption("-a", "x86_64"), ServerOption("-B", "V=1 W=2"),
                   ServerOption("-D", "A=1"), ServerOption("-I", "/y y"),
                   ServerOption("-R", "/rt")]
        argv = translator_argv("stap", "6.1", options, TMP, ["-p4"])
        self.assertEqual(argv, ["stap", "-r6.1", "-a", "x86_64", "-BV=1 W=2", "-DA=1",
                                "-I/y y", "-R/rt", "--tmpdir=" + TMP, "--client-options",
                                "-p4"])

    def test_client_sign_module_dropped(self) -> None:
        argv = translator_argv("stap", "6.1", [], TMP,
                               ["-p4", "--sign-module=/etc/shadow", "--sign-mod", "-e",
                                "--sign-module=kept as script", "--", "--sign-module"])
        self.assertEqual(argv[4:], ["-p4", "-e", "--sign-module=kept as script", "--",
                                    "--sign-module"])


class PrivilegeTests(TestCase):
    def check(self, argv: list[str], expected: Privilege, invalid: str | None = None) -> None:
        result = requested_privilege(argv)
        self.assertEqual((result.privilege, result.invalid_value), (expected, invalid), argv)

    def test_captured_requests(self) -> None:
        requests = captured_requests()
        self.check(arguments_of(requests["02-privilege-stapusr"]), Privilege.STAPUSR)
        self.check(arguments_of(requests["req-p4-stapusr-e"]), Privilege.STAPUSR)
        self.check(arguments_of(requests["01-trivial-p4"]), Privilege.STAPDEV)

    def test_forms(self) -> None:
        self.check(["--privilege=stapsys"], Privilege.STAPSYS)
        self.check(["--privilege", "stapusr"], Privilege.STAPUSR)
        self.check(["--unprivileged"], Privilege.STAPUSR)
        self.check(["--unpriv"], Privilege.STAPUSR)
        self.check(["--priv=stapusr"], Privilege.STAPUSR)
        self.check(["--privilege=root"], Privilege.STAPDEV, "root")
        self.check([], Privilege.STAPDEV)

    def test_first_one_decides(self) -> None:
        self.check(["--privilege=stapusr", "--privilege=stapdev"], Privilege.STAPUSR)
        self.check(["--unprivileged", "--privilege=stapdev"], Privilege.STAPUSR)

    def test_option_arguments_are_not_options(self) -> None:
        self.check(["-e", "--privilege=stapusr"], Privilege.STAPDEV)
        self.check(["-pe", "--privilege=stapusr"], Privilege.STAPUSR)
        self.check(["-vve", "--unprivileged"], Privilege.STAPDEV)
        self.check(["--vp", "--unprivileged"], Privilege.STAPDEV)

    def test_double_dash_ends_options(self) -> None:
        self.check(["script.stp", "--", "--privilege=stapusr"], Privilege.STAPDEV)

    def test_non_options_are_skipped(self) -> None:
        self.check(["script/x.stp", "arg", "--privilege=stapsys"], Privilege.STAPSYS)

    def test_ambiguous_abbreviation_is_ignored(self) -> None:
        # --p matches privilege, poison-cache, prologue-searching...
        self.check(["--p=stapusr"], Privilege.STAPDEV)


class ScanTests(TestCase):
    def test_color_colour_abbreviation_is_not_ambiguous(self) -> None:
        self.assertEqual([o.name for o in scan_options(["--col"])], ["color"])

    def test_optional_argument_only_with_equals(self) -> None:
        options = scan_options(["--use-server", "host"])
        self.assertEqual([(o.name, o.value) for o in options], [("use-server", None)])

    def test_without_sign_module_keeps_everything_else(self) -> None:
        self.assertEqual(without_sign_module(["-p4", "-e", "x"]), ["-p4", "-e", "x"])
