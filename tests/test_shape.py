"""No function in ``stapsrv/`` is longer than 60 lines (the project's rule:
a longer one does several jobs, and each deserves a name)."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "stapsrv"
LONGEST = 60


def long_functions(root: Path, longest: int = LONGEST) -> list[str]:
    """``path:line name (N lines)`` of every function or method under
    ``root`` whose ``def`` to last line spans more than ``longest`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > longest:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} "
                                 f"{node.name} ({lines} lines)")
    return found


class FunctionLengthTests(SynchronousTestCase):
    def test_no_function_over_60_lines(self) -> None:
        self.assertEqual(long_functions(PACKAGE), [])

    def test_a_long_function_is_named(self) -> None:
        root = Path(self.mktemp()) / "pkg"
        root.mkdir(parents=True)
        body = "".join(f"    x{n} = {n}\n" for n in range(60))
        (root / "m.py").write_text(f"def short():\n    pass\n\n\nasync def long():\n{body}")
        self.assertEqual(long_functions(root), ["pkg/m.py:5 long (61 lines)"])
