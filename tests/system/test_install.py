"""make install-system / uninstall-system on this machine (root, as in CI)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import ROOT, require, require_header_release, require_program
from tests.helpers.realserver import Client, remove_tree, scratch_directory

INSTALLED = ["/usr/lib/stapsrv", "/usr/local/bin/stap-server", "/etc/default/stap-server",
             "/etc/stap-server", "/run/stap-server", "/var/log/stap-server",
             "/usr/lib/tmpfiles.d/stap-server.conf", "/etc/systemd/system/stap-server.service",
             "/etc/logrotate.d/stap-server", "/usr/local/share/man/man8/stap-server.8",
             "/usr/local/share/man/cs/man8/stap-server.8", "/var/lib/stap-server",
             "/etc/systemtap/ssl/client", "/etc/systemtap/staprun"]


def listing() -> list[str]:
    """Every installed path with its type, mode and owner (no times)."""
    existing = [p for p in INSTALLED if os.path.lexists(p)]
    result = subprocess.run(
        ["find", *existing, "-path", "*/__pycache__", "-prune", "-o",
         "-printf", "%p %y %m %u %g\\n"], capture_output=True, text=True, check=True)
    return sorted(result.stdout.splitlines())


def make(*targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), *targets], capture_output=True, text=True,
                          timeout=900)


class InstallSystemTests(TestCase):
    timeout = 1200

    def setUp(self) -> None:
        require(os.geteuid() == 0, "make install-system needs root")
        require_program("stap")

    async def test_install_serve_reinstall_uninstall(self) -> None:
        first = make("install-system")
        self.assertEqual(first.returncode, 0, first.stderr)
        self.addCleanup(make, "uninstall-system")
        before = listing()
        self.assertIn("/usr/local/bin/stap-server l 777 root root", before)
        self.assertIn("/var/log/stap-server d 755 stap-server stap-server", before)
        self.assertIn("/run/stap-server d 755 stap-server stap-server", before)
        self.assertIn("/var/lib/stap-server d 750 stap-server stap-server", before)
        if shutil.which("systemd-analyze"):
            verified = subprocess.run(
                ["systemd-analyze", "verify", "/etc/systemd/system/stap-server.service"],
                capture_output=True, text=True)
            self.assertEqual((verified.returncode, verified.stderr), (0, ""))
        second = make("install-system")
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual(listing(), before, "a second install changes nothing")

        release = require_header_release()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
               "STAPSRV_LISTEN": "127.0.0.1"}
        started = subprocess.run(["stap-server", "start", "-u", "stap-server", "-r", release],
                                 capture_output=True, text=True, env=env, cwd="/", timeout=120)
        self.addCleanup(subprocess.run, ["stap-server", "stop"], env=env, cwd="/",
                        capture_output=True)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        status = subprocess.run(["stap-server", "status"], capture_output=True, text=True,
                                env=env, cwd="/")
        self.assertEqual(status.returncode, 0)
        pid = int(re.search(r"running as PID (\d+)", status.stdout).group(1))
        self.assertEqual(pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name, "stap-server")
        port = re.findall(r"Using network address \[127\.0\.0\.1\]:(\d+)",
                          Path("/var/log/stap-server/log").read_text())[-1]
        # Root's clients trust an installed server system-wide: no --trust-servers,
        # no per-user database.
        for database in ("/etc/systemtap/ssl/client", "/etc/systemtap/staprun"):
            listed = subprocess.run(["certutil", "-L", "-d", f"sql:{database}"],
                                    capture_output=True, text=True)
            self.assertRegex(listed.stdout, r"stap-server\s+P,P,P", database)
        client = Client(scratch_directory("install-client-"))
        self.addCleanup(remove_tree, client.dir)
        out, err, code = await client.stap(f"--use-server=127.0.0.1:{port}", "-r", release,
                                           "-p4", "-e", 'probe begin { println("sys"); exit() }')
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(client.modules()), 1)
        stopped = subprocess.run(["stap-server", "stop"], capture_output=True, text=True,
                                 env=env, cwd="/")
        self.assertEqual(stopped.returncode, 0)

        rendered = subprocess.run(["man", "-l", "-Tutf8", "/usr/local/share/man/man8/stap-server.8"],
                                  capture_output=True, text=True)
        self.assertEqual(rendered.returncode, 0, rendered.stderr)

        removed = make("uninstall-system")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        left = listing()
        self.assertFalse(any(line.startswith(("/usr/lib/stapsrv", "/usr/local/bin/stap-server",
                                              "/etc/systemd", "/etc/logrotate.d"))
                             for line in left), left)
        self.assertTrue(any(line.startswith("/var/log/stap-server ") for line in left),
                        "user data (logs) are kept unless PURGE is asked for")
