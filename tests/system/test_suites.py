"""Kernel releases of other Debian suites, from the real archive, through
the kernel store's private apt configuration: the newest bookworm-backports
6.12 release and the newest trixie release, picked from the suites' lists
at run time, are fetched with their own suite's kbuild, listed with their
suite, and served by a server started with --fetch-suites; the machine's
own apt configuration and lists are untouched throughout.  No module is
built for a 6.12 kernel here (that needs a newer translator than 4.8)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.core.aptsources import policy_suite
from stapsrv.kernel.privateapt import APT_DIRECTORY
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import (
    as_server_user,
    owned_directory,
    remove_tree,
    scratch_directory,
)
from tests.helpers.waiting import poll
from tests.system.test_kernels import kernels_command

SUITES = "bookworm-backports,trixie,trixie-security,trixie-updates"
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def host_apt_state() -> dict[str, str]:
    """What the machine's apt has on disk: every file under /etc/apt (its
    digest) and /var/lib/apt/lists (size and modification time)."""
    state: dict[str, str] = {}
    for top, how in (("/etc/apt", "digest"), ("/var/lib/apt/lists", "stat")):
        for directory, _, files in os.walk(top):
            for name in files:
                path = os.path.join(directory, name)
                try:
                    if how == "digest":
                        state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                    else:
                        info = os.stat(path)
                        state[path] = f"{info.st_size} {info.st_mtime_ns}"
                except OSError as exc:
                    state[path] = f"unreadable {exc.errno}"
    return state


def private_apt(store: Path, *words: str, directory: str = APT_DIRECTORY) -> str:
    """``apt-cache`` through the store's private configuration (``directory``:
    another architecture's, ``.apt-arm64``), as the server's user."""
    result = subprocess.run(
        as_server_user(["apt-cache", "-c", str(store / directory / "apt.conf"), *words]),
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                          "LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def newest(store: Path, pattern: str, suites: tuple[str, ...],
           directory: str = APT_DIRECTORY) -> str:
    """The newest plain-flavour release matching ``pattern`` whose headers
    apt takes from one of ``suites``, in the store's lists (``directory``:
    its private apt configuration, another architecture's)."""
    names = private_apt(store, "pkgnames", "linux-headers-", directory=directory).split()
    releases = [name[len("linux-headers-"):] for name in names
                if re.fullmatch(pattern, name[len("linux-headers-"):])]
    def version(release: str) -> tuple[int, ...]:
        found = _VERSION.match(release)
        assert found is not None
        return tuple(map(int, found.groups()))

    for release in sorted(releases, key=version, reverse=True):
        policy = private_apt(store, "policy", f"linux-headers-{release}",
                             directory=directory)
        candidate = re.search(r"Candidate: (\S+)", policy)
        if candidate and policy_suite(policy, candidate.group(1)) in suites:
            return release
    raise AssertionError(f"no release matching {pattern} in {suites}: {sorted(releases)}")


class SuitesTests(RealClientMixin, TestCase):
    def setUp(self) -> None:
        super().setUp()
        base = scratch_directory("suites-")
        self.addCleanup(remove_tree, base)
        self.store = owned_directory(base / "store")
        self.host_before = host_apt_state()

    def assert_host_untouched(self) -> None:
        self.assertEqual(host_apt_state(), self.host_before)

    def assert_tree(self, release: str, suite: str) -> None:
        root = self.store / release / "root"
        tree = root / "usr" / "src" / f"linux-headers-{release}"
        abi = release.rsplit("-", 1)[0]
        self.assertIn(f"{self.store}/{release}/root/usr/src/linux-headers-{abi}-common/Makefile",
                      (tree / "Makefile").read_text())
        self.assertIn("CONFIG_MODULES=y", (tree / ".config").read_text())
        scripts = (tree / "scripts").resolve()
        self.assertEqual(scripts, root / "usr" / "lib" / f"linux-kbuild-{abi}" / "scripts")
        self.assertTrue((scripts / "Makefile.build").is_file())
        listed = kernels_command(self.store, "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        line = next(line for line in listed.stdout.splitlines()
                    if line.startswith(f"{release}\t"))
        self.assertIn(f" linux-kbuild-{abi}=", line)
        self.assertTrue(line.endswith(f"\tfrom {suite}"), line)

    async def test_newest_backports_and_trixie_releases_through_the_private_apt(self) -> None:
        # The first command writes the configuration and updates the lists.
        first = kernels_command(self.store, "--suites", SUITES, "prefetch", "--no-symbols",
                                "no-such-release-0-amd64")
        self.assertEqual(first.returncode, 1, first.stderr)
        self.assertRegex(first.stderr, r"updated the lists of bookworm-backports trixie "
                         r"trixie-security trixie-updates in [0-9.]+ s")
        self.assertIn("the Debian suites this server uses (bookworm-backports trixie "
                      "trixie-security trixie-updates) has no kernel headers", first.stderr)
        backports = newest(self.store, r"6\.12\.\d+\+deb12-amd64", ("bookworm-backports",))
        trixie = newest(self.store, r"\d+\.\d+\.\d+\+deb13(\.\d+)?-amd64",
                        ("trixie", "trixie-security", "trixie-updates"))
        fetched = kernels_command(self.store, "--suites", SUITES, "prefetch", "--no-symbols",
                                  backports)
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertNotIn("updated the lists", fetched.stderr)  # fresh: not again
        self.assert_tree(backports, "bookworm-backports")
        # The trixie release with its System.map, made from its image
        # (linux-image-*, through the private configuration too).
        fetched = kernels_command(self.store, "--suites", SUITES, "prefetch", trixie)
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertIn(f"{trixie}: System.map in ", fetched.stdout)
        trixie_suite = re.search(rf"Fetching kernel {re.escape(trixie)}: .* from (\S+)",
                                 fetched.stderr)
        assert trixie_suite is not None, fetched.stderr
        self.assert_tree(trixie, trixie_suite.group(1))
        system_map = self.store / ".debug" / trixie / "root" / f"System.map-{trixie}"
        self.assertRegex(system_map.read_text()[:100000], r"\n[0-9a-f]{16} [Tt] \S+")
        # Only the private directory has lists of these suites.
        lists = [path.name for path in (self.store / APT_DIRECTORY / "state" / "lists").iterdir()]
        self.assertTrue(any("bookworm-backports_InRelease" in name for name in lists), lists)
        self.assert_host_untouched()

        # A server with those suites serves the stored releases, and their
        # kernel series join its fetch policy once its lists are updated.
        server = self.own_server("--kernel-store", str(self.store), "--no-avahi",
                                 "--fetch-suites", SUITES)
        self.assertTrue(await poll(
            lambda: "Kernel store: fetching releases matching" in server.log(), 300.0),
            server.log())
        log = server.log()
        self.assertIn(f"from the suites {SUITES.replace(',', ' ')} (apt configuration "
                      f"{self.store}/{APT_DIRECTORY}/apt.conf)", log)
        self.assertIn("6.12.*+deb12-amd64", log)
        self.assertIn("+deb13-amd64", log)
        # 4.8 does not build for 6.12.  With the host's toolchain alone (no
        # other in this store) its translator tries and fails in pass 4;
        # nothing crashes.
        client = await self.trusted_client(server)
        out, err, code = await client.stap(f"--use-server={server.spec}", "-r", backports,
                                           "-p4", "-e", 'probe begin { exit() }')
        self.assertNotEqual(code, 0)
        self.assertIn("Pass 4: compilation failed", err.decode())
        self.assertEqual(client.modules(), [])
        self.assertNotIn(b"Traceback", err)
        self.assertIsNone(server.process.poll())
        self.assertNotIn("Unhandled", server.log())
        self.assertNotIn(f"Fetching kernel {backports}", server.log())  # stored already
        server.stop()
        self.assert_host_untouched()
