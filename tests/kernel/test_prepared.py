"""Which releases of the lists are prepared, and the records of it
(stapsrv.kernel.prepared)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.kernel import prepared
from stapsrv.kernel.prepared import Preparation, listed_releases


def everything(release: str) -> bool:
    return True


class SelectionTests(TestCase):
    def test_newest_of_each_series_and_flavour(self) -> None:
        packages = ["linux-headers-6.1.0-27-amd64", "linux-headers-6.1.0-28-amd64",
                    "linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-28-common",
                    "linux-headers-6.1.0-28-common-rt", "linux-headers-6.1.0-27-cloud-amd64",
                    "linux-headers-6.1.0-28-rt-amd64", "linux-headers-amd64",
                    "linux-headers-6.12.9+deb13-amd64", "linux-headers-6.12.12+deb13-amd64",
                    "linux-image-6.1.0-99-amd64", "linux-headers-6.1.0-29-arm64"]
        self.assertEqual(sorted(listed_releases(packages, everything)), [
            "6.1.0-27-cloud-amd64", "6.1.0-28-amd64", "6.1.0-28-rt-amd64",
            "6.1.0-29-arm64", "6.12.12+deb13-amd64"])

    def test_only_what_the_policy_allows(self) -> None:
        packages = ["linux-headers-6.1.0-28-amd64", "linux-headers-6.1.0-28-rt-amd64"]
        self.assertEqual(listed_releases(packages, lambda release: "rt" not in release),
                         ["6.1.0-28-amd64"])
        self.assertEqual(listed_releases(["linux-headers-../x-amd64"], everything), [])


class RecordTests(TestCase):
    def test_round_trip_and_summary(self) -> None:
        store = Path(self.mktemp())
        record = Preparation("6.1.0-28-amd64", 1000.0, (("fetch", 7.5), ("stapconf", 19.0)),
                             1030.0, by="host-a")
        prepared.save(store, record)
        self.assertEqual(prepared.load(store, record.release), record)
        self.assertEqual(prepared.load_all(store), [record])
        self.assertEqual(record.state(), "ready")
        self.assertEqual(record.summary(), "ready 30.0 s after it appeared in the lists "
                         "(fetch 7.5 s, stapconf 19.0 s) by host-a")
        self.assertEqual(Preparation("6.1.0-29-amd64", 5.0, failure="no room").state(),
                         "failed")

    def test_a_damaged_record_is_none(self) -> None:
        store = Path(self.mktemp())
        (store / ".prepared").mkdir(parents=True)
        (store / ".prepared" / "6.1.0-28-amd64.json").write_text('{"release": 1')
        (store / ".prepared" / "6.1.0-29-amd64.json").symlink_to("/etc/passwd")
        self.assertEqual(prepared.load_all(store), [])
