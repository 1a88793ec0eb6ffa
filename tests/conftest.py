"""Test setup: import the pack under a fixed name and find a real ComfyUI for the host tests.

The pack is imported as ``distilled_unets`` whatever its folder is called, so relative imports work
as they do inside ComfyUI. ComfyUI is found through COMFYUI_PATH, the ComfyUI whose custom_nodes/
holds this checkout, or ~/ComfyUI. Host tests (tests/comfy/) skip with one line when none is found.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "distilled_unets"


def _import_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


_import_pack()


def find_comfyui() -> Path | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if ROOT.parent.name == "custom_nodes":
        candidates.append(ROOT.parent.parent)
    candidates.append(Path.home() / "ComfyUI")
    for c in candidates:
        if (c / "comfy" / "model_patcher.py").is_file():
            return c.resolve()
    return None


COMFYUI = find_comfyui()
_HOST_ERROR: str | None = None


def _setup_host() -> str | None:
    """Put ComfyUI on sys.path in CPU mode. Returns a reason string when it cannot be used."""
    if COMFYUI is None:
        return "no ComfyUI found (set COMFYUI_PATH, or put ComfyUI at ~/ComfyUI)"
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.disable_all_custom_nodes = True
        import comfy.model_management  # noqa: F401
        import comfy_api.latest  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"ComfyUI at {COMFYUI} does not import: {type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    global _HOST_ERROR
    host_items = [it for it in items if "tests/comfy" in str(it.fspath).replace(os.sep, "/")
                  or it.get_closest_marker("host")]
    if not host_items:
        return
    _HOST_ERROR = _setup_host()
    for it in host_items:
        it.add_marker(pytest.mark.host)
        if _HOST_ERROR:
            it.add_marker(pytest.mark.skip(reason=_HOST_ERROR))


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    if COMFYUI is None or _HOST_ERROR:
        pytest.skip(_HOST_ERROR or "no ComfyUI found")
    return COMFYUI
