"""The Debian package: built and linted, then installed with apt in a
bookworm booted under a real systemd (systemd-nspawn), served to a real
client on the host, reloaded, stopped mid-compile, killed, upgraded and
purged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.helpers import ROOT, require, require_header_release, require_program
from tests.helpers.nspawn import Container, prepared_root
from tests.helpers.realserver import Client, remove_tree, scratch_directory

PORT = 5919
UNIT = "stap-server"
LOG = "/var/log/stap-server/log"
CERT = "var/lib/stap-server/.systemtap/ssl/server/stap.cert"
#: The admin's own files for the test: a server on PORT for the headers'
#: release, on loopback only.  Removed before the purge's comparison.
SERVER_CONF = "etc/stap-server/conf.d/test.conf"
DROP_IN = "etc/systemd/system/stap-server.service.d/test.conf"


def build_package(out: Path) -> Path:
    built = subprocess.run(["bash", str(ROOT / "tools" / "build-deb.sh"), str(out)],
                           capture_output=True, text=True, timeout=1800)
    if built.returncode != 0:
        raise AssertionError(f"build failed: {built.stdout[-3000:]}{built.stderr[-3000:]}")
    (deb,) = out.glob("stapsrv_*.deb")
    return deb


def bumped(deb: Path, out: Path) -> Path:
    """The same package as a newer version (what a rebuild of the next
    release is to the maintainer scripts)."""
    out.mkdir(parents=True)
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.*)$", text, re.M).group(1)  # type: ignore[union-attr]
    control.write_text(text.replace(f"Version: {version}", f"Version: {version}+1"))
    newer = out / f"stapsrv_{version}+1_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(newer)], check=True,
                   capture_output=True)
    return newer


class DebianPackageTests(TestCase):
    timeout = 3600

    def setUp(self) -> None:
        require(os.geteuid() == 0, "booting a container needs root")
        for program in ("dpkg-buildpackage", "lintian", "debootstrap", "systemd-nspawn",
                        "nsenter", "stap"):
            require_program(program)
        self.release = require_header_release()
        self.scratch = scratch_directory("debian-")
        self.addCleanup(remove_tree, self.scratch)

    def serial(self, container: Container) -> int:
        return x509.load_der_x509_certificate((container.root / CERT).read_bytes()).serial_number

    def wait_active(self, container: Container, timeout: float = 300) -> str:
        """Wait for the unit to be active (systemd says so only after
        READY=1, i.e. once the server listens); its main PID."""
        deadline = time.monotonic() + timeout
        while True:
            state = container.run("systemctl", "is-active", UNIT, check=False).stdout.strip()
            if state == "active":
                return container.run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
            if time.monotonic() > deadline:
                journal = container.run("journalctl", "-u", UNIT, "--no-pager", check=False)
                raise AssertionError(f"{UNIT} is {state}: {journal.stdout[-4000:]}")
            time.sleep(1)

    def wait_for_line(self, container: Container, text: str, after: int,
                      timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in (container.root / LOG.lstrip("/")).read_text()[after:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log")
            time.sleep(0.5)

    async def test_install_serve_reload_stop_restart_upgrade_purge(self) -> None:
        deb = build_package(self.scratch / "dist")
        lint = subprocess.run(["lintian", str(deb)], capture_output=True, text=True,
                              timeout=900)
        findings = [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")]
        self.assertEqual((lint.returncode, findings), (0, []), lint.stdout + lint.stderr)

        container = Container(prepared_root(self.release), self.scratch / "container")
        self.addCleanup(container.close)
        root = container.root
        shutil.copy(deb, root / "root" / deb.name)
        (root / SERVER_CONF).parent.mkdir(parents=True)
        (root / SERVER_CONF).write_text(f"NICKNAME=test\nRELEASE={self.release}\nPORT={PORT}\n")
        (root / DROP_IN).parent.mkdir(parents=True)
        (root / DROP_IN).write_text("[Service]\nEnvironment=STAPSRV_LISTEN=127.0.0.1\n")
        container.boot()
        before = container.listing()

        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        container.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                      f"/root/{deb.name}", env=apt)
        # The package enables and starts the unit.
        self.assertEqual(container.run("systemctl", "is-enabled", UNIT).stdout.strip(),
                         "enabled")
        first_pid = self.wait_active(container)
        owner = container.run("ps", "-o", "user=", "-p", first_pid).stdout.strip()
        self.assertEqual(owner, "stap-server")

        client = Client(scratch_directory("debian-client-"))
        self.addCleanup(remove_tree, client.dir)
        spec = f"127.0.0.1:{PORT}"
        await client.trust(spec)
        out, err, code = await client.stap(f"--use-server={spec}", "-r", self.release, "-p4",
                                           "-e", 'probe begin { println("deb"); exit() }')
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)

        # reload reopens the log: logrotate's move, then a fresh file.
        log = root / LOG.lstrip("/")
        log.rename(log.with_name("log.1"))
        container.run("systemctl", "reload", UNIT)
        deadline = time.monotonic() + 60
        while not (log.exists() and "Reopened the log file" in log.read_text()):
            self.assertLess(time.monotonic(), deadline, "the log was not reopened")
            time.sleep(0.5)
        self.assertEqual(self.wait_active(container), first_pid, "reload keeps the process")

        # stop while a compile runs: the client still gets its module.
        for module in client.cwd.iterdir():
            module.unlink()
        seen = len(log.read_text())
        compiling: Deferred[tuple[bytes, bytes, int]] = client.stap(
            f"--use-server={spec}", "-r", self.release, "-p4",
            "-e", 'probe begin { println("draining"); exit() }')
        self.wait_for_line(container, "Processing 1 request", seen)
        stop = await ensureDeferred(_in_thread(container, "systemctl", "stop", UNIT))
        self.assertEqual(stop.returncode, 0, stop.stderr)
        out, err, code = await compiling
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)
        self.assertEqual(container.run("systemctl", "is-active", UNIT, check=False)
                         .stdout.strip(), "inactive")

        # kill -9: systemd starts it again (Restart=on-failure).
        container.run("systemctl", "start", UNIT)
        killed = self.wait_active(container)
        container.run("kill", "-9", killed)
        deadline = time.monotonic() + 120
        while True:
            pid = self.wait_active(container)
            if pid not in (killed, "0"):
                break
            self.assertLess(time.monotonic(), deadline, "not restarted")
            time.sleep(1)
        journal = container.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
        self.assertIn(f"Using network address [127.0.0.1]:{PORT}", journal)
        self.assertIn("Reopened the log file", journal)
        self.assertRegex(journal, r"Main process exited, code=killed, status=9/KILL")

        # upgrade keeps the identity, the trust, the caches, the configuration.
        serial = self.serial(container)
        cache = sorted(p.name for p in (root / "var/lib/stap-server/.systemtap/stapsrv-cache")
                       .rglob("*"))
        self.assertTrue(cache, "the compiles left cached responses")
        defaults = root / "etc/default/stap-server"
        defaults.write_text(defaults.read_text() + "# the admin's line\n")
        newer = bumped(deb, self.scratch / "newer")
        shutil.copy(newer, root / "root" / newer.name)
        container.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                      f"/root/{newer.name}", env=apt)
        self.wait_active(container)
        self.assertEqual(self.serial(container), serial)
        self.assertIn("# the admin's line", defaults.read_text())
        self.assertEqual(sorted(p.name for p in (root / "var/lib/stap-server/.systemtap/"
                                                 "stapsrv-cache").rglob("*")), cache)
        trusted = container.run("certutil", "-L", "-d", "sql:/etc/systemtap/ssl/client").stdout
        self.assertRegex(trusted, r"stap-server\s+P,P,P")
        for module in client.cwd.iterdir():
            module.unlink()
        out, err, code = await client.stap(f"--use-server={spec}", "-r", self.release, "-p4",
                                           "-e", 'probe begin { println("deb"); exit() }')
        self.assertEqual(code, 0, "the client's old trust still holds: " + err.decode())

        # purge: nothing the package made is left.
        (root / SERVER_CONF).unlink()
        (root / DROP_IN).unlink()
        (root / DROP_IN).parent.rmdir()
        container.run("apt-get", "purge", "-y", "-q", "stapsrv", env=apt)
        after = container.listing()
        self.assertEqual(sorted(after - before), [], "left by the package")
        self.assertEqual(sorted(before - after),
                         sorted(["/etc/stap-server", "/etc/stap-server/conf.d", "/" + SERVER_CONF,
                                 "/" + DROP_IN, "/" + str(Path(DROP_IN).parent)]),
                         "only the test's own files and the package's directories go")
        self.assertEqual(container.run("getent", "passwd", "stap-server", check=False)
                         .returncode, 2)
        self.assertEqual(container.run("getent", "group", "stap-server", check=False)
                         .returncode, 2)


async def _in_thread(container: Container, *argv: str) -> subprocess.CompletedProcess[str]:
    """A blocking container command run off the reactor (the client's
    compile must go on meanwhile)."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    return await deferToThreadPool(reactor, reactor.getThreadPool(),  # type: ignore[attr-defined]
                                   lambda: container.run(*argv))
