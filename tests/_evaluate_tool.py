"""``tools/evaluate.py`` for the tests: its path (for subprocess runs) and its ``main`` run in the test process."""

from __future__ import annotations

import importlib.util
import os
import sys

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "evaluate.py")
_MODULE = "distilled_unets_evaluate_tool"


def main(argv) -> int:
    """``tools/evaluate.py``'s main in this process (loaded by path: a PyPI package is also called evaluate)."""
    if _MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE, TOOL)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[_MODULE].main(argv, own_logging=False)
