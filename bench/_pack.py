"""Bench setup: the pack imported as ``distilled_unets`` and ComfyUI on the path, through the same
``tools/_host.py`` the tests and tools use (benches run as plain scripts, so tools/ is put on the path here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import _host  # noqa: E402
from _host import REPO as ROOT  # noqa: E402, F401  (re-exported for the bench scripts)
from _host import import_pack  # noqa: E402, F401


def comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI to bench against (``explicit``, COMFYUI_PATH, the enclosing ComfyUI or ~/ComfyUI);
    exits with a message when there is none."""
    found = _host.find_comfyui(explicit)
    if found is None:
        sys.exit(_host.missing_reason(explicit))
    return found


def setup_comfy(explicit: str | os.PathLike | None = None, *, append: bool = False) -> Path:
    """Put ComfyUI on sys.path with its arguments set for a bench: CPU unless ``BENCH_DEVICE`` says
    otherwise, no other custom nodes. Exits with a message when absent."""
    try:
        return _host.setup_comfy(explicit, cpu=os.environ.get("BENCH_DEVICE", "cpu") == "cpu", append=append)
    except _host.HostError as e:
        sys.exit(str(e))
