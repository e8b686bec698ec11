"""The client x kernel table of doc/admin-guide.md agrees with the
matching of :func:`stapsrv.kernel.toolchains.choose`: a cell that runs is
served by the toolchain it names, a refused one gets a ``Server:`` line.
(tests/system/test_client_kernels.py checks the same table against the
real server and VM; this one runs without them, on the releases and
compilers written under the table.)"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.kernel.toolchains import Toolchain, choose, kernel_version

GUIDE = Path(__file__).resolve().parents[2] / "doc" / "admin-guide.md"
BEGIN = "<!-- client-kernel-table begin"
END = "<!-- client-kernel-table end -->"
_SERIES = re.compile(r"(\S+) `([^`]+)` \(headers call `([^`]+)`\)")


def table() -> tuple[list[str], dict[str, list[str]], dict[str, tuple[str, str]]]:
    """The suites, each client's cells, and each suite's release and
    compiler, as the guide has them."""
    text = GUIDE.read_text()
    part = text[text.index(BEGIN):text.index(END)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("|") and not line.startswith("|---")]
    suites = rows[0][1:]
    cells = {row[0].split()[0]: row[1:] for row in rows[1:]}
    series = {suite: (release, compiler) for suite, release, compiler in _SERIES.findall(part)}
    return suites, cells, series


def toolchain(base: Path, name: str, translator: str, compilers: tuple[str, ...]) -> Toolchain:
    """A toolchain whose root has ``compilers`` (as plain and as
    x86_64-linux-gnu- names)."""
    bin_directory = base / name / "usr" / "bin"
    bin_directory.mkdir(parents=True)
    for compiler in compilers:
        for each in (compiler, f"x86_64-linux-gnu-{compiler}"):
            (bin_directory / each).write_text("")
    return Toolchain(name, base / name, translator)


class GuideTableTests(TestCase):
    def test_every_cell_is_what_the_matching_answers(self) -> None:
        suites, cells, series = table()
        self.assertEqual(suites, ["bookworm", "bookworm-backports", "trixie", "forky"])
        self.assertEqual(sorted(cells), ["4.8", "5.5", "5.6"])
        self.assertEqual(sorted(series), sorted(suites))
        base = Path(self.mktemp())
        # The host's (bookworm: gcc-12) and forky's (gcc-12, -14 and its
        # default -16: tests/system/test_toolchains checks the real root).
        toolchains = [toolchain(base, "host", "4.8", ("gcc-12",)),
                      toolchain(base, "forky", "5.6", ("gcc-12", "gcc-14", "gcc-16"))]
        checked = 0
        for client, row in cells.items():
            for suite, cell in zip(suites, row):
                release, compiler = series[suite]
                answer = choose(toolchains, client, release, kernel_version(release), compiler)
                served = re.fullmatch(r"runs \((\S+) (\S+)\)", cell)
                if served:
                    self.assertIsInstance(answer, Toolchain, (client, suite, answer))
                    assert isinstance(answer, Toolchain)
                    self.assertEqual((answer.name, answer.translator), served.groups())
                elif cell == "refused":
                    self.assertIsInstance(answer, str, (client, suite))
                    self.assertTrue(str(answer).startswith("Server: "), answer)
                else:  # served, and the module failed to build or load
                    self.assertIn(cell, ("fails to load", "fails to build"))
                    self.assertIsInstance(answer, Toolchain, (client, suite, answer))
                checked += 1
        self.assertEqual(checked, 12)
