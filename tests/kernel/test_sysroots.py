"""Which root a request's user-space probes resolve against: the
distribution of the release's suite, the host's files for the host's own,
a toolchain of that suite for another, nothing when the translator's own
system is already of that distribution."""

from __future__ import annotations

from pathlib import Path

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from stapsrv.kernel.sysroots import (
    UserSpace,
    discover_roots,
    distribution,
    host_distribution,
    load_root,
    sysroots_directory,
    user_space,
)
from stapsrv.kernel.toolchains import Toolchain, host_toolchain, manifest_text

HOST = host_toolchain("4.8")
FORKY = Toolchain("forky", Path("/store/.toolchains/forky/root"), "5.6", digest="f" * 16,
                  suite="forky")
TRIXIE = evolve(FORKY, name="trixie", root=Path("/store/.toolchains/trixie/root"),
                suite="trixie-updates")


def make_user_root(directory: Path, suite: str = "trixie") -> Path:
    """A user-space root directory with the files that make it serve."""
    (directory / "root" / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (directory / "manifest.json").write_text(manifest_text(
        directory.name, suite, 1.0, {"libc6": "2.41-12", "base-files": "13.8"}))
    return directory


class DistributionTests(SynchronousTestCase):
    def test_updates_of_a_release_belong_to_it(self) -> None:
        for suite in ("bookworm", "bookworm-backports", "bookworm-security",
                      "bookworm-updates", "bookworm-proposed-updates",
                      "bookworm-backports-sloppy"):
            self.assertEqual(distribution(suite), "bookworm", suite)
        self.assertEqual(distribution("forky"), "forky")
        self.assertEqual(distribution("-security"), "-security")

    def test_host_distribution_from_os_release(self) -> None:
        path = Path(self.mktemp())
        path.write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
                        'VERSION_CODENAME=bookworm\nID=debian\n')
        self.assertEqual(host_distribution(path), "bookworm")
        path.write_text('ID=debian\nVERSION_CODENAME=""\n')
        self.assertIsNone(host_distribution(path))
        self.assertIsNone(host_distribution(path.with_name("absent")))


class UserSpaceTests(SynchronousTestCase):
    def test_a_hosts_release_through_another_toolchain_gets_the_hosts_files(self) -> None:
        for suite in (None, "bookworm", "bookworm-backports", "bookworm-security"):
            self.assertEqual(user_space(FORKY, suite, "bookworm", [HOST, FORKY]),
                             UserSpace("bookworm", Path("/"), "host"), suite)

    def test_nothing_when_the_translators_system_is_the_clients(self) -> None:
        self.assertEqual(user_space(HOST, None, "bookworm", [HOST, FORKY]),
                         UserSpace("bookworm"))
        self.assertEqual(user_space(FORKY, "forky", "bookworm", [HOST, FORKY]),
                         UserSpace("forky"))

    def test_another_distribution_through_a_toolchain_of_its_suite(self) -> None:
        found = user_space(FORKY, "trixie-security", "bookworm", [HOST, FORKY, TRIXIE])
        self.assertEqual(found, UserSpace("trixie", TRIXIE.root,
                                          f"toolchain {TRIXIE.label()}"))

    def test_no_root_of_that_distribution_is_said(self) -> None:
        self.assertEqual(user_space(FORKY, "trixie", "bookworm", [HOST, FORKY]),
                         UserSpace("trixie", missing=True))

    def test_an_unknown_host_resolves_nothing(self) -> None:
        self.assertEqual(user_space(FORKY, None, None, [HOST, FORKY]), UserSpace(None))


class UserRootTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = Path(self.mktemp()).absolute()
        self.trixie = load_root(make_user_root(sysroots_directory(self.store) / "trixie"))

    def test_a_made_root_comes_before_a_toolchain_of_its_suite(self) -> None:
        found = user_space(FORKY, "trixie", "bookworm", [HOST, FORKY, TRIXIE], [self.trixie])
        self.assertEqual(found, UserSpace("trixie", self.trixie.root, self.trixie.label()))
        self.assertTrue(found.label.startswith("root trixie "), found)
        # Not for the host's own distribution, nor the toolchain's.
        self.assertEqual(user_space(FORKY, "bookworm-backports", "bookworm", [HOST, FORKY],
                                    [self.trixie]).root, Path("/"))

    def test_damaged_roots_are_named(self) -> None:
        broken = make_user_root(sysroots_directory(self.store) / "forky", "forky")
        (broken / "root" / "usr" / "lib" / "x86_64-linux-gnu").rmdir()
        (broken / "root" / "usr" / "lib").rmdir()
        (sysroots_directory(self.store) / "Bad name").mkdir()
        found, damaged = discover_roots(self.store)
        self.assertEqual(found, [self.trixie])
        self.assertEqual(len(damaged), 1, damaged)
        self.assertTrue(damaged[0].startswith("root forky: "), damaged)
        self.assertIn("has no C library", damaged[0])
        self.assertEqual(discover_roots(self.store / "absent"), ([], []))
