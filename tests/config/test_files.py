from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.config.files import (
    ConfigError,
    GlobalConfig,
    ServerSettings,
    parse,
    read_global,
    read_server_file,
    render_status,
    settings_from,
    LIST_VARIABLES,
    SCALAR_VARIABLES,
)
from tests.helpers import ROOT

# manager.md 9.2's observed status file.
OBSERVED_STATUS = """ARCH=x86_64
USER=root
BUILD+='V=1 W=2'
INCLUDE+=/x
INCLUDE+=/y y
DEFINE+=A=1
NICKNAME=3006
RUNTIME=
RELEASE+=6.1.0-56-amd64
LOG=/var/log/stap-server/log
PORT=5101
SSL=
MAXTHREADS=
MAXREQSIZE=
MAXCOMPRESSEDREQ=
"""


def server(text: str) -> ServerSettings:
    return settings_from(parse(text, "t.conf", SCALAR_VARIABLES, LIST_VARIABLES))


class GrammarTests(TestCase):
    def test_comments_blanks_and_literal_values(self) -> None:
        settings = server("# a comment\n\n  ARCH=i386 # not a comment  \n"
                          "RUNTIME=~me/$HOME/\"q\"\\x\n")
        self.assertEqual(settings.arch, "i386 # not a comment")
        self.assertEqual(settings.runtime, '~me/$HOME/"q"\\x')

    def test_last_line_without_newline_counts(self) -> None:
        self.assertEqual(server("PORT=1\nMAXTHREADS=3").max_threads, "3")

    def test_lists(self) -> None:
        settings = server("INCLUDE=/a\nINCLUDE+=/b\nINCLUDE+=\nINCLUDE+=()\nINCLUDE+=/y y\n"
                          "BUILD+=V=1\nBUILD=\nDEFINE=X\nDEFINE=()\nRELEASE=r1\nRELEASE+=r2\n")
        self.assertEqual(settings.includes, ("/a", "/b", "/y y"))
        self.assertEqual(settings.builds, ())
        self.assertEqual(settings.defines, ())
        self.assertEqual(settings.releases, ("r1", "r2"))

    def test_empty_scalars_mean_default(self) -> None:
        self.assertEqual(server("ARCH=\nUSER=\n"), ServerSettings())

    def test_errors_name_file_and_line(self) -> None:
        for text, bad in (("PORT=1\nFOO=2\n", "FOO=2"), ("ARCH x86_64\n", "ARCH x86_64"),
                          ("ARCH+=x\n", "ARCH+=x"), ("ARCH =x\n", "ARCH =x"),
                          ("arch=x\n", "arch=x")):
            with self.assertRaises(ConfigError) as caught:
                server(text)
            self.assertEqual(caught.exception.line, bad)
            self.assertIn(f'Invalid input, "{bad}", in t.conf (line', str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            server("# ok\nPORT=1\nBAD\n")
        self.assertEqual(caught.exception.line_number, 3)


class GlobalTests(TestCase):
    def test_defaults_environment_and_order(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        first = base / "first"
        first.write_text("CONFIG_PATH=/c1\nSTAT_PATH=/s1\nLOG_FILE=/l1\n")
        second = base / "second"
        second.write_text("CONFIG_PATH=/c2\nSTAT_PATH=\nSTAP_USER=srv")
        self.assertEqual(read_global([base / "missing"], {}), GlobalConfig())
        self.assertEqual(read_global([], {"STAP_USER": "envuser"}).stap_user, "envuser")
        self.assertEqual(read_global([first, second], {"STAP_USER": "envuser"}),
                         GlobalConfig(Path("/c2"), Path("/s1"), Path("/l1"), "srv"))

    def test_unknown_global_variable(self) -> None:
        path = Path(self.mktemp())
        path.write_text("ARCH=x86_64\n")
        self.assertRaises(ConfigError, read_global, [path], {})


class StatusTests(TestCase):
    def test_observed_status_file_round_trips(self) -> None:
        path = Path(self.mktemp())
        path.write_text(OBSERVED_STATUS)
        settings = read_server_file(path)
        self.assertEqual(settings.includes, ("/x", "/y y"))
        self.assertEqual(settings.builds, ("'V=1 W=2'",))
        self.assertEqual(settings.nickname, "3006")
        self.assertEqual(render_status(settings), OBSERVED_STATUS)

    def test_line_breaks_are_refused(self) -> None:
        self.assertRaises(ValueError, render_status, ServerSettings(nickname="a\nPORT=1"))


class ShippedExamplesTests(TestCase):
    def test_config_directory_examples_parse(self) -> None:
        root = ROOT / "config"
        config = read_global([root / "stap-server.global"], {})
        self.assertEqual(config, GlobalConfig(stap_user="stap-server"))
        settings = read_server_file(root / "conf.d" / "native.conf.example")
        self.assertEqual(settings, ServerSettings(nickname="native"))
