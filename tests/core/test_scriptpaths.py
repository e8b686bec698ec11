"""Which server paths a script names (stapsrv.core.scriptpaths), in each
form the translator reads: the paths found, and the forms that make an
answer uncacheable.  The joining rules were checked against the 4.8
translator's ``-p1`` output (adjacent literals joined, also after a
macro; ``.`` between literals refused in probe points and ``@cast``)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.compile.job import request_paths
from stapsrv.core.scriptpaths import scan_script


class FoundPathTests(TestCase):
    def paths(self, text: str) -> tuple[str, ...]:
        scanned = scan_script(text.encode())
        self.assertIsNone(scanned.uncacheable, text)
        return scanned.paths

    def test_process_probe(self) -> None:
        self.assertEqual(self.paths('probe process("/usr/bin/ls").begin {}'),
                         ("/usr/bin/ls",))

    def test_adjacent_literals_are_joined(self) -> None:
        self.assertIn("/usr/bin/ls", self.paths(
            'probe process("/usr/" /* c */ "bin/ls").begin {}'))
        self.assertIn("/dev/zero", self.paths('probe begin { x = "/dev/"\n "zero" }'))

    def test_cast_module_list(self) -> None:
        self.assertEqual(self.paths(
            'probe begin { println(@cast(0, "t", "/opt/a.so:/opt/b")->x) }'),
            ("/opt/a.so", "/opt/b"))

    def test_var_module(self) -> None:
        self.assertEqual(self.paths('probe begin { println(@var("v@x.c", "/opt/app")) }'),
                         ("/opt/app",))

    def test_module_by_path_and_library_by_path(self) -> None:
        self.assertEqual(self.paths(
            'probe module("/opt/m.ko").function("f") {} '
            'probe process("/opt/app").library("/opt/lib.so").function("g") {}'),
            ("/opt/app", "/opt/lib.so", "/opt/m.ko"))

    def test_comments_name_nothing(self) -> None:
        self.assertEqual(self.paths(
            '# "/etc/a"\n// "/etc/b"\n/* "/etc/c" */ probe begin { println("hi") }'), ())

    def test_both_branches_of_a_conditional(self) -> None:
        self.assertEqual(self.paths(
            '%( arch == "x86_64" %? probe process("/opt/a").begin {} '
            '%: probe process("/opt/b").begin {} %)'), ("/opt/a", "/opt/b"))

    def test_escaped_quote_does_not_end_a_literal(self) -> None:
        self.assertEqual(self.paths(r'probe begin { println("say \"hi\"", "/opt/x") }'),
                         ("/opt/x",))

    def test_format_strings_are_no_paths(self) -> None:
        self.assertEqual(self.paths('probe begin { printf("%d/%d\\n", 1, 2) }'), ())


class UncacheableFormTests(TestCase):
    def reason(self, text: str) -> str:
        scanned = scan_script(text.encode())
        self.assertIsNotNone(scanned.uncacheable, text)
        assert scanned.uncacheable is not None
        return scanned.uncacheable

    def test_header_forms(self) -> None:
        for module in ("<linux/sched.h>", "kernel<linux/sched.h>",
                       "kernel<linux/a.h><linux/b.h>", "/opt/a:<stdio.h>"):
            self.assertIn("header", self.reason(
                f'probe begin {{ println(@cast(0, "task_struct", "{module}")->pid) }}'))

    def test_header_form_split_over_literals(self) -> None:
        self.assertIn("header", self.reason(
            'probe begin { println(@cast(0, "t", "kern" "el<linux/" "sched.h>")->pid) }'))

    def test_relative_process_and_library_names(self) -> None:
        self.assertIn("relative", self.reason('probe process("ls").begin {}'))
        self.assertIn("relative", self.reason('probe process("l" "s").begin {}'))
        self.assertIn("relative", self.reason(
            'probe process("/bin/ls").library("libc.so.6").function("f") {}'))

    def test_process_from_an_argument_or_macro(self) -> None:
        for argument in ("@1", "$1", "@P"):
            self.reason(f"probe process({argument}).begin {{}}")

    def test_path_joined_by_the_preprocessor(self) -> None:
        self.assertIn("preprocessor", self.reason(
            '@define P %( "/usr/bin/l" %) probe begin { println(@cast(0, "t", @P "s")) }'))
        self.assertIn("preprocessor", self.reason(
            'probe begin { println(@cast(0, "t", "/opt/" @1)) }'))

    def test_glob_and_escape(self) -> None:
        self.assertIn("glob", self.reason('probe process("/usr/bin/*").begin {}'))
        self.assertIn("escape", self.reason('probe begin { println(@cast(0, "t", "/opt/\\x61")) }'))

    def test_include_in_embedded_c(self) -> None:
        self.assertIn("#include", self.reason('%{ #include "/opt/x.h" %} probe begin {}'))

    def test_ldd_option(self) -> None:
        self.assertIn("ldd", request_paths(["--ldd", "-e", "probe begin {}"], []).uncacheable
                      or "")


class ModuleNameTests(TestCase):
    """The modules ``module("name")`` probe points name, whose debuginfo
    the server may fetch."""

    def modules(self, text: str) -> tuple[str, ...]:
        return scan_script(text.encode()).modules

    def test_plain_names(self) -> None:
        self.assertEqual(self.modules(
            'probe module("ext4").function("ext4_file_open") { println($filp) }\n'
            'probe module ( "nf_conntrack" ).statement("*@x.c:1") {}\n'
            'probe module("ext4").function("x").return {}'),
            ("ext4", "nf_conntrack"))

    def test_paths_globs_and_joined_literals_are_not_names(self) -> None:
        self.assertEqual(self.modules(
            'probe module("/opt/x.ko").function("f") {}\n'
            'probe module("ext*").function("f") {}\n'
            'probe module("ext" "4").function("f") {}\n'
            'probe module(@1).function("f") {}\n'
            '# probe module("commented").function("f") {}\n'
            'probe kernel.function("vfs_read") { printf("module(\\"x\\")") }'), ())

    def test_request_collects_names_of_e_scripts_and_files(self) -> None:
        found = request_paths(["-e", 'probe module("xfs").function("f") {}', "script/x.stp"],
                              [b'probe module("ext4").function("g") {}'])
        self.assertEqual(found.modules, ("ext4", "xfs"))
