"""The benches and tools import the pack's public names where they are: every ``from distilled_unets.<module>
import <names>`` in bench/*.py and tools/*.py resolves in the real ComfyUI (a module moved or a name renamed in
the pack breaks the scripts nobody runs in the suite; this catches it without running them)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for folder in ("bench", "tools") for p in (ROOT / folder).glob("*.py"))


def _pack_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distilled_unets":
            yield node.module, [a.name for a in node.names], node.lineno


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_pack_name_a_script_imports_exists(script):
    missing = []
    for module, names, line in _pack_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"line {line}: {module} ({e})")
            continue
        for n in names:
            if not hasattr(mod, n):
                try:
                    importlib.import_module(f"{module}.{n}")
                except ImportError:
                    missing.append(f"line {line}: {module}.{n}")
    assert not missing, "\n".join(missing)
