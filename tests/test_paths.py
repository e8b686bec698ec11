"""Host facts (stapsrv.paths): the SystemTap directory and architecture names."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.paths import (
    default_server_ssl_dir,
    local_client_db_dir,
    manager_architecture,
    translator_architecture,
)


class PathTests(TestCase):
    def test_systemtap_dir(self) -> None:
        env = {"SYSTEMTAP_DIR": "/srv/stap", "HOME": "/home/someone"}
        self.assertEqual(local_client_db_dir(env), Path("/srv/stap/ssl/client"))
        self.assertEqual(default_server_ssl_dir(env), Path("/srv/stap/ssl/server"))

    def test_home(self) -> None:
        env = {"HOME": "/home/someone"}
        self.assertEqual(local_client_db_dir(env), Path("/home/someone/.systemtap/ssl/client"))
        self.assertEqual(default_server_ssl_dir(env),
                         Path("/home/someone/.systemtap/ssl/server"))

    def test_empty_systemtap_dir_ignored(self) -> None:
        env = {"SYSTEMTAP_DIR": "", "HOME": "/home/someone"}
        self.assertEqual(local_client_db_dir(env), Path("/home/someone/.systemtap/ssl/client"))

    def test_passwd_fallback(self) -> None:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        self.assertEqual(local_client_db_dir({}), home / ".systemtap" / "ssl" / "client")
        self.assertEqual(default_server_ssl_dir({}), home / ".systemtap" / "ssl" / "server")

    def test_process_environment_default(self) -> None:
        self.assertEqual(local_client_db_dir(), local_client_db_dir(os.environ))


class ArchitectureTests(TestCase):
    def test_translator_architecture(self) -> None:
        for machine, arch in [("x86_64", "x86_64"), ("i686", "i386"), ("aarch64", "arm64"),
                              ("armv7l", "arm"), ("ppc64le", "powerpc"), ("s390x", "s390"),
                              ("mips64", "mips"), ("riscv64", "riscv64")]:
            self.assertEqual(translator_architecture(machine), arch)

    def test_manager_architecture(self) -> None:
        for machine, arch in (("x86_64", "x86_64"), ("i686", "i386"), ("aarch64", "arm64"),
                              ("armv7l", "arm"), ("ppc64le", "powerpc"), ("s390x", "s390"),
                              ("mips64", "mips"), ("sh4", "sh"), ("sun4u", "sparc64")):
            self.assertEqual(manager_architecture(machine), arch)

    def test_where_the_two_4_8_spellings_differ(self) -> None:
        """stap (util.cxx) and the stap-server script disagree on a few
        names; each keeps its own, as in 4.8."""
        for machine, translator, manager in (("sa1100", "sa1100", "arm"), ("sh5", "sh5", "sh"),
                                             ("sa110", "arm", "arm"), ("sh4a", "sh", "sh4a"),
                                             ("s390", "s390", "s390"), ("i386", "i386", "i386")):
            self.assertEqual((translator_architecture(machine), manager_architecture(machine)),
                             (translator, manager), machine)
