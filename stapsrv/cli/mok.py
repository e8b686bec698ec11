"""``python -m stapsrv.cli.mok list | generate | remove FINGERPRINT``: the
machine owner keys of the default MOK store (run it as the server user)."""

from __future__ import annotations

import sys

from stapsrv.identity import mok
from stapsrv.paths import default_mok_store


def main(argv: list[str]) -> int:
    store = default_mok_store()
    if argv[:1] == ["list"]:
        for name in mok.server_moks(store):
            print(name)
        return 0
    if argv[:1] == ["generate"]:
        print(mok.generate(store))
        return 0
    if len(argv) == 2 and argv[0] == "remove":
        if mok.remove(store, argv[1]):
            return 0
        print(f"No MOK {argv[1]} in {store}", file=sys.stderr)
        return 1
    print("usage: python -m stapsrv.cli.mok list | generate | remove FINGERPRINT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
