"""Test setup: the pack imported as ``distilled_unets`` and a real ComfyUI for the host tests, both
through ``tools/_host.py`` (the one place that finds ComfyUI and imports the pack; ``tools/`` is on the
path through pytest's ``pythonpath`` setting in pyproject.toml).

ComfyUI is ``COMFYUI_PATH``, the ComfyUI whose custom_nodes/ holds this checkout, or ~/ComfyUI. Host
tests (tests/comfy/, or marked ``host``) skip with one line when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _host import REPO, comfyui_version, find_comfyui, import_pack, missing_reason, setup_comfy

ROOT = REPO
import_pack()

COMFYUI = find_comfyui()
_HOST_ERROR: str | None = None


def _setup_host() -> str | None:
    """Put ComfyUI on sys.path in CPU mode. Returns a reason string when it cannot be used."""
    if COMFYUI is None:
        return missing_reason()
    try:
        setup_comfy(COMFYUI)
        import comfy.model_management  # noqa: F401
        import comfy_api.latest  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"ComfyUI at {COMFYUI} does not import: {type(e).__name__}: {e}"
    return None


def pytest_report_header(config):
    return f"ComfyUI: {comfyui_version(COMFYUI)} at {COMFYUI}" if COMFYUI else f"ComfyUI: {missing_reason()}"


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
        pytest.skip(_HOST_ERROR or missing_reason())
    return COMFYUI
