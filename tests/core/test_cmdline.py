from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, TestCase

from stapsrv.core.cmdline import (
    LONG_OPTIONS,
    SHORT_OPTIONS,
    Privilege,
    ServerOption,
    requested_privilege,
    scan_options,
    translator_argv,
    without_release,
    without_sign_module,
)
from tests.helpers.strategies import client_arguments, client_word, fixed
from tests.helpers.vectors import arguments_of, captured_requests

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


_PRIVILEGES = {"stapusr": Privilege.STAPUSR, "stapsys": Privilege.STAPSYS,
               "stapdev": Privilege.STAPDEV}


class _LongOption(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("has_arg", ctypes.c_int),
                ("flag", ctypes.POINTER(ctypes.c_int)), ("val", ctypes.c_int)]


class GlibcGetopt:
    """The C library's ``getopt_long`` with stap's tables: the reference that
    ``scan_options`` must agree with (stap itself parses with it)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            raise SkipTest("needs glibc's getopt_long as the reference")
        if "POSIXLY_CORRECT" in os.environ:
            raise SkipTest("POSIXLY_CORRECT changes getopt_long's permutation")
        self._getopt = libc.getopt_long
        self._getopt.restype = ctypes.c_int
        self._getopt.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                 ctypes.c_char_p, ctypes.POINTER(_LongOption),
                                 ctypes.POINTER(ctypes.c_int)]
        self._optind = ctypes.c_int.in_dll(libc, "optind")
        self._opterr = ctypes.c_int.in_dll(libc, "opterr")
        self._optarg = ctypes.c_char_p.in_dll(libc, "optarg")
        self._long_names = list(LONG_OPTIONS)
        self._table = (_LongOption * (len(self._long_names) + 1))()
        for index, name in enumerate(self._long_names):
            # stap gives color and colour the same code; glibc then does not
            # call an abbreviation of both ambiguous.
            code = 256 + self._long_names.index("color" if name == "colour" else name)
            self._table[index] = _LongOption(name.encode(), LONG_OPTIONS[name].value, None, code)

    def options(self, arguments: Sequence[str]) -> list[tuple[str | None, str | None]]:
        """(name, value) for each ``getopt_long`` result; ``None`` for ``'?'``."""
        words = [b"stap"] + [os.fsencode(word) for word in arguments]
        argv = (ctypes.c_char_p * (len(words) + 1))(*words, None)
        self._optind.value = 0  # full re-initialisation
        self._opterr.value = 0
        found: list[tuple[str | None, str | None]] = []
        long_index = ctypes.c_int()
        while True:
            long_index.value = -1
            code = self._getopt(len(words), argv, SHORT_OPTIONS.encode(), self._table,
                                ctypes.byref(long_index))
            if code == -1:
                return found
            if code == ord("?"):
                found.append((None, None))
                continue
            name = self._long_names[long_index.value] if code >= 256 else chr(code)
            value = self._optarg.value
            found.append((name, None if value is None else os.fsdecode(value)))

    def privilege(self, arguments: Sequence[str]) -> Privilege:
        """The privilege stap itself takes from ``arguments``."""
        for name, value in self.options(arguments):
            if name == "privilege":
                return _PRIVILEGES.get(value or "", Privilege.STAPDEV)
            if name == "unprivileged":
                return Privilege.STAPUSR
        return Privilege.STAPDEV


@functools.cache
def glibc() -> GlibcGetopt:
    """The one reference instance (building its tables is not free)."""
    return GlibcGetopt()


def _names_sign_module(word: str) -> bool:
    """Whether ``word`` spells ``--sign-module`` (possibly abbreviated)."""
    name = word[2:].partition("=")[0] if word.startswith("--") else ""
    return len(name) >= 2 and "sign-module".startswith(name)


_SERVER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126),
                        min_size=1, max_size=10)
_server_option = st.one_of(
    st.builds(ServerOption, st.sampled_from(["-a", "-B", "-D", "-I", "-R"]), _SERVER_VALUE),
    st.just(ServerOption("-k")))
_server_options = st.lists(_server_option, max_size=5)
_release = st.from_regex(r"[0-9][a-z0-9_.+-]{0,15}", fullmatch=True)
_tmpdir = st.from_regex(r"/[A-Za-z0-9._/ -]{1,30}", fullmatch=True)


def _server_words(options: list[ServerOption]) -> list[tuple[str | None, str | None]]:
    return [(o.flag[1], None if o.flag == "-k" else o.value) for o in options]


class TranslatorArgvPropertyTests(TestCase):
    """Whatever a client sends, the command line keeps the server's options."""

    @fixed(200)
    @given(release=_release, options=_server_options, tmpdir=_tmpdir,
           raw=st.lists(st.one_of(client_word.map(os.fsencode),
                                  st.binary(max_size=10).map(lambda b: b.replace(b"\0", b""))),
                        max_size=12))
    def test_layout_and_verbatim_client_bytes(
        self, release: str, options: list[ServerOption], tmpdir: str, raw: list[bytes]
    ) -> None:
        """argv is stap, -r<release>, the server options, --tmpdir, --client-options,
        then the client's bytes unchanged and in order, less only words that
        spell --sign-module."""
        arguments = [os.fsdecode(word) for word in raw]  # as the handler reads them
        argv = translator_argv("/usr/bin/stap", release, options, tmpdir, arguments)
        prefix = ["/usr/bin/stap", "-r" + release]
        for option in options:
            prefix += option.words()
        prefix += ["--tmpdir=" + tmpdir, "--client-options"]
        self.assertEqual(argv[:len(prefix)], prefix)
        passed = [os.fsencode(word) for word in argv[len(prefix):]]
        remaining = iter(raw)
        for word in passed:  # a subsequence of the client's words
            for candidate in remaining:
                if candidate == word:
                    break
                self.assertTrue(_names_sign_module(os.fsdecode(candidate)), candidate)
            else:
                self.fail(f"{word!r} is not one of the client's words in order")
        for candidate in remaining:
            self.assertTrue(_names_sign_module(os.fsdecode(candidate)), candidate)

    @fixed(300)
    @given(release=_release, options=_server_options, tmpdir=_tmpdir,
           arguments=client_arguments)
    def test_getopt_sees_server_options_first_and_no_sign_module(
        self, release: str, options: list[ServerOption], tmpdir: str, arguments: list[str]
    ) -> None:
        """Parsed by glibc as stap parses it, the command line yields -r, the
        server options, --tmpdir and --client-options first and exactly as
        the server set them (so every client -R/-B/-r/--tmpdir comes after
        --client-options, where stap refuses or checks it), and no
        --sign-module at all; exactly the client's own --sign-module options
        were dropped."""
        getopt = glibc()
        argv = translator_argv("/usr/bin/stap", release, options, tmpdir, arguments)
        expected = ([("r", release)] + _server_words(options)
                    + [("tmpdir", tmpdir), ("client-options", None)])
        seen = getopt.options(argv[1:])
        self.assertEqual(seen[:len(expected)], expected)
        self.assertNotIn("sign-module", [name for name, _ in seen])
        client_part = argv[4 + sum(len(option.words()) for option in options):]
        self.assertEqual(seen[len(expected):], getopt.options(client_part))
        client_signs = [name for name, _ in getopt.options(arguments) if name == "sign-module"]
        self.assertEqual(len(arguments) - len(client_part), len(client_signs))

    @fixed(100)
    @given(flag=st.sampled_from(["-B", "-D", "-I", "-R"]),
           value=st.sampled_from(["", "x"]), arguments=client_arguments)
    @example(flag="-B", value="", arguments=["-p4"])
    def test_any_server_value_keeps_tmpdir(
        self, flag: str, value: str, arguments: list[str]
    ) -> None:
        """An empty server option value (``stap-serverd -B ''``, or
        ``stap-server start -D ''``) must not swallow --tmpdir."""
        getopt = glibc()
        argv = translator_argv("stap", "6.1", [ServerOption(flag, value)], TMP, arguments)
        self.assertEqual(getopt.options(argv[1:])[:4], [
            ("r", "6.1"), (flag[1], value), ("tmpdir", TMP), ("client-options", None)])

    @fixed(300)
    @given(stap=st.text(), release=st.text(), tmpdir=st.text(),
           options=st.lists(st.builds(ServerOption, st.sampled_from(["-a", "-B", "-k"]),
                                      st.text()), max_size=3),
           arguments=st.lists(st.text(), max_size=10))
    def test_never_raises(self, stap: str, release: str, tmpdir: str,
                          options: list[ServerOption], arguments: list[str]) -> None:
        """Arbitrary text (NUL, surrogates, anything) never makes the builder,
        the privilege reader or the scanner raise; option slices stay in
        bounds and in order."""
        argv = translator_argv(stap, release, options, tmpdir, arguments)
        self.assertEqual(argv[0], stap)
        self.assertTrue(all(isinstance(word, str) for word in argv))
        self.assertIsInstance(requested_privilege(argv[1:]).privilege, Privilege)
        last_start = 0
        for option in scan_options(arguments):
            self.assertTrue(0 <= option.start < option.stop <= len(arguments), option)
            self.assertGreaterEqual(option.start, last_start)
            last_start = option.start


class GetoptCompatibilityPropertyTests(TestCase):
    """``scan_options`` and ``requested_privilege`` against glibc's getopt_long."""

    @fixed(500)
    @given(arguments=client_arguments)
    @example(arguments=["--unprivileged=x"])
    def test_scan_matches_glibc(self, arguments: list[str]) -> None:
        """Every option, its value, and every '?' come out as glibc reports them
        (color and colour being one option to stap)."""
        getopt = glibc()

        def same(name: str | None) -> str | None:
            return "color" if name == "colour" else name

        found = [(same(option.name), option.value) for option in scan_options(arguments)]
        self.assertEqual(found, [(same(name), value) for name, value in getopt.options(arguments)])

    @fixed(300)
    @given(arguments=client_arguments)
    def test_privilege_matches_stap_whenever_stap_accepts_the_line(
        self, arguments: list[str]
    ) -> None:
        """When getopt_long finds no error (so stap goes on to build), the
        privilege the server signs for is the one stap builds for."""
        getopt = glibc()
        argv = translator_argv("/usr/bin/stap", "6.1", [], TMP, arguments)
        if (None, None) in getopt.options(argv[1:]):
            return  # stap stops with an error: nothing gets signed
        self.assertEqual(requested_privilege(argv[1:]).privilege, getopt.privilege(argv[1:]))

    @fixed(200)
    @given(options=_server_options, arguments=client_arguments)
    def test_privilege_of_full_line_is_privilege_of_client_arguments(
        self, options: list[ServerOption], arguments: list[str]
    ) -> None:
        """The handler reads the privilege from the whole command line, the
        cache key from the client's arguments alone: both give one answer,
        and dropping --sign-module never changes it."""
        argv = translator_argv("/usr/bin/stap", "6.1", options, TMP, arguments)
        self.assertEqual(requested_privilege(argv[1:]), requested_privilege(arguments))
        self.assertEqual(requested_privilege(without_sign_module(arguments)),
                         requested_privilege(arguments))


class ReleaseTreeTests(TestCase):
    def test_the_clients_release_goes_for_a_stored_tree(self) -> None:
        self.assertEqual(without_release(["-r", "R", "-p4", "-e", "x"], "R"),
                         ["-p4", "-e", "x"])
        self.assertEqual(without_release(["-rR", "-vr", "R", "-vrR", "-p4"], "R"),
                         ["-v", "-v", "-p4"])
        # Another release, a script argument and words after -- stay.
        self.assertEqual(without_release(["-r", "S", "-e", "-r R", "--", "-r", "R"], "R"),
                         ["-r", "S", "-e", "-r R", "--", "-r", "R"])
