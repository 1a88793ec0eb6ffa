"""Import the pack as ``distilled_unets`` from this checkout (benches run as plain scripts)."""

from __future__ import annotations

import importlib.util
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
