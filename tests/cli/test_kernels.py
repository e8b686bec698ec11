"""``kernels list``: its first line (what the store holds against its
ceiling, the administrators' roots named apart) and what it says of
prepared releases."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.kernels import list_store
from stapsrv.kernel import prepared
from stapsrv.kernel.prepared import Preparation
from stapsrv.kernel.store import KernelStore


class ListTests(TestCase):
    def listed(self, store: KernelStore) -> str:
        out = io.StringIO()
        list_store(store, out)
        return out.getvalue().splitlines()[0]

    def test_roots_are_counted_and_named(self) -> None:
        store = KernelStore(Path(self.mktemp()), 2048 << 20)
        store.open()
        self.assertEqual(self.listed(store),
                         f"Kernel store {store.directory}: 0 releases, 0.0 MB of 2147.5 MB")
        forky = store.directory / ".toolchains" / "forky"
        (forky / "root").mkdir(parents=True)
        (forky / "manifest.json").write_text(json.dumps({"size": 805 << 20, "packages": {}}))
        self.assertEqual(self.listed(store),
                         f"Kernel store {store.directory}: 0 releases, 844.1 MB of 2147.5 MB "
                         "(toolchains and user-space roots: 844.1 MB)")

    def test_prepared_and_failed_releases(self) -> None:
        store = KernelStore(Path(self.mktemp()).absolute(), 1 << 30)
        store.open()
        prepared.save(store.directory, Preparation(
            "6.1.0-57-amd64", 1000.0, (("fetch", 7.0), ("symbols", 5.5), ("stapconf", 19.7)),
            1040.0, by="host-a"))
        prepared.save(store.directory, Preparation("6.1.0-58-amd64", 1000.0,
                                                   failure="no room", by="host-a"))
        out = io.StringIO()
        list_store(store, out)
        lines = out.getvalue().splitlines()
        self.assertIn("6.1.0-57-amd64\tprepared: ready 40.0 s after it appeared in the lists "
                      "(fetch 7.0 s, symbols 5.5 s, stapconf 19.7 s) by host-a", lines)
        self.assertIn("6.1.0-58-amd64\tprepared: not ready: no room by host-a", lines)
