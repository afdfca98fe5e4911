"""The repository's shape: two wings, and each fact in one place.

The core (minibert/, train.py, evaluate.py) is what a reader learns from and what training and
evaluation need; the lab (lab/: the paper runner, the dev search, reports, agreement, benchmarks)
imports the core and is never imported by it.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

from minibert.experiments import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CORE = [*sorted((ROOT / "minibert").glob("*.py")), ROOT / "train.py", ROOT / "evaluate.py"]


def imported_modules(path):
    """Every module a file imports, relative imports resolved within the minibert package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("minibert." if node.level else "") + (node.module or ""))
    return names


def test_the_core_never_imports_the_lab():
    for path in CORE:
        lab = sorted(name for name in imported_modules(path) if name == "lab" or name.startswith("lab."))
        assert not lab, f"{path.relative_to(ROOT)} imports {', '.join(lab)}"


def test_the_makefile_has_a_target_for_every_preset():
    text = (ROOT / "Makefile").read_text()
    listed = re.search(r"^EXPERIMENTS := ((?:.*\\\n)*.*)$", text, re.M)[1].replace("\\\n", " ").split()
    assert listed == list(PRESETS)


@pytest.mark.parametrize("line", ["import lab.report", "from lab import paper", "from lab.tune import ranking"])
def test_the_wing_check_sees_an_import_of_the_lab(line, tmp_path, monkeypatch):
    planted = tmp_path / "model.py"
    planted.write_text(f"import torch\n\n\ndef forward():\n    {line}\n")
    monkeypatch.setattr(sys.modules[__name__], "CORE", [*CORE, planted])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="model.py imports lab"):
        test_the_core_never_imports_the_lab()
