"""``kernels list``'s first line: what the store holds against its
ceiling, the administrators' roots named apart."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.cli.kernels import list_store
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
