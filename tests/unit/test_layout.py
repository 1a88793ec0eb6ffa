"""The tree keeps the architecture its docstrings state (README "Layout", models/__init__.py):

* ``models/`` never imports ComfyUI (``comfy``, ``comfy_api``, ``folder_paths``, ``server``, ``nodes``, ...);
* its groups import only the groups above them: ``structure`` < ``files`` < ``patches`` < ``students``
  (``models/errors.py`` serves all);
* ``nodes/host/`` (the bridge to ComfyUI's model classes) never imports ``folder_paths``, ``server`` or the node API;
* no module of the pack, its tools or benches imports another module's private (``_x``) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["structure", "files", "patches", "students"]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                "execution", "latent_preview", "node_helpers"}


def _modules(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _package(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] != "__init__" else parts[:-1]


def _imports(path: Path, tree: ast.AST):
    """(absolute module as a list of parts, or None for a top-level module name; imported names; line)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split("."), [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = _package(path)[: len(_package(path)) - (node.level - 1)]
                yield base + (node.module.split(".") if node.module else []), names, node.lineno
            else:
                yield (node.module or "").split("."), names, node.lineno


def _group(parts: list[str]) -> str | None:
    return parts[1] if len(parts) > 1 and parts[0] == "models" and parts[1] in ORDER else None


def test_models_never_imports_the_host_and_its_groups_import_only_those_above():
    bad = []
    for path, tree in _modules("models"):
        mine = _group(list(path.relative_to(ROOT).parts))
        for mod, names, line in _imports(path, tree):
            where = f"{path.relative_to(ROOT)}:{line}"
            if mod[0] in HOST_MODULES:
                bad.append(f"{where} imports {'.'.join(mod)}")
            targets = [mod] if mod[-1:] != ["models"] else [mod + [n] for n in names]
            for target in targets:
                theirs = _group(target)
                if mine and theirs and ORDER.index(theirs) > ORDER.index(mine):
                    bad.append(f"{where}: models/{mine} imports models/{theirs} ({'.'.join(target)})")
    assert not bad, "\n".join(bad)


def test_the_host_bridge_stays_below_the_node_api():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {'.'.join(mod)}" for p, tree in _modules("nodes/host")
           for mod, _, line in _imports(p, tree) if mod[0] in ("folder_paths", "server")
           or mod[:2] == ["comfy_api", "latest"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["models", "nodes", "tools", "bench"])
def test_no_module_imports_another_modules_private_names(folder):
    bad = []
    for path, tree in _modules(folder):
        for mod, names, line in _imports(path, tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {'.'.join(mod)}")
    assert not bad, "\n".join(bad)
