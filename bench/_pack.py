"""Import the pack as ``distilled_unets`` from this checkout (benches run as plain scripts)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """The pack module, registered under its fixed name so its relative imports work."""
    if "distilled_unets" not in sys.modules:
        spec = importlib.util.spec_from_file_location("distilled_unets", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["distilled_unets"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["distilled_unets"]


def setup_comfy():
    """Put ComfyUI (``COMFYUI_PATH`` or ``~/ComfyUI``) on sys.path with its arguments set for a bench: CPU
    unless ``BENCH_DEVICE`` says otherwise, no other custom nodes. Exits with a message when absent."""
    comfy_root = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser()
    if not (comfy_root / "comfy" / "model_patcher.py").is_file():
        sys.exit(f"no ComfyUI at {comfy_root}: set COMFYUI_PATH")
    sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    if os.environ.get("BENCH_DEVICE", "cpu") == "cpu":
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = True
