"""Kernel configuration headers shared by a fleet (stapsrv.compile.sharedconf):
what is packed, what is refused when unpacked, what the key follows."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.compile.sandbox import StapconfStore
from stapsrv.compile.sharedconf import fleet_key, header_names, pack, unpack

HEADER = "1c/stapconf_1cc3dd833f360ba51660a29abbf5d2b6_1343.h"
OTHER = "e6/stapconf_e64d56d51b516796e796d5fde5c46974_1415.h"


class PackTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.one = StapconfStore(self.base / "one")
        self.two = StapconfStore(self.base / "two")

    def put(self, store: StapconfStore, name: str, text: str) -> None:
        (store.directory / name).parent.mkdir(parents=True, exist_ok=True)
        (store.directory / name).write_text(text)

    def test_what_a_warm_up_added_goes_to_the_other(self) -> None:
        self.put(self.one, OTHER, "#define OLD 1\n")
        before = header_names(self.one)
        self.assertIsNone(pack(self.one, before))
        self.put(self.one, HEADER, "#define STAPCONF_X 1\n")
        entry = pack(self.one, before)
        assert entry is not None
        self.assertEqual(list(json.loads(entry)["headers"]), [HEADER])
        self.assertEqual(unpack(self.two, entry), 1)
        self.assertEqual((self.two.directory / HEADER).read_text(), "#define STAPCONF_X 1\n")
        self.assertEqual(header_names(self.two), {HEADER})

    def test_refused_shapes(self) -> None:
        for headers in ({"../../etc/x/stapconf_a.h": "x"}, {"1c/../../x.h": "x"},
                        {HEADER: 5}, {}, {f"1c/stapconf_{'0' * 32}_1.h/../x": "x"}):
            entry = json.dumps({"format": "stapconf-1", "headers": headers}).encode()
            with self.assertRaises(ValueError):
                unpack(self.two, entry)
        with self.assertRaises(ValueError):
            unpack(self.two, b'{"format": "stapconf-2", "headers": {}}')
        self.assertFalse(self.two.directory.exists())


class KeyTests(TestCase):
    def test_the_key_follows_what_the_translator_hashes(self) -> None:
        tree = Path(self.mktemp()).absolute()
        tree.mkdir()
        (tree / ".config").write_text("CONFIG_MODULES=y\n")
        key = fleet_key("6.1.0-28-amd64", tree, "/usr/bin/stap", "/usr/bin/gcc", None, False,
                        ["-B x"])
        self.assertEqual(key, fleet_key("6.1.0-28-amd64", tree, "/usr/bin/stap",
                                        "/usr/bin/gcc", None, False, ["-B x"]))
        self.assertNotEqual(key, fleet_key("6.1.0-28-amd64", tree, "/usr/bin/stap",
                                           "/usr/bin/gcc", None, True, ["-B x"]))
        os.utime(tree / ".config", (1, 1))
        self.assertNotEqual(key, fleet_key("6.1.0-28-amd64", tree, "/usr/bin/stap",
                                           "/usr/bin/gcc", None, False, ["-B x"]))
