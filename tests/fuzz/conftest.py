"""Settings of the fuzz suite (how many cases, which seed) and the per-reader counts at the end of the session.

``--fuzz-cases N`` (or ``DISTILLED_UNETS_FUZZ_CASES=N``) sets the inputs per reader, ``--fuzz-seed S`` (or
``DISTILLED_UNETS_FUZZ_SEED``) the Hypothesis seed, ``--fuzz-report FILE`` writes the counts as JSON. The options
are declared in ``tests/conftest.py`` (pytest reads options only from the top conftest).
"""

from __future__ import annotations

import json
import os

import pytest

from ._harness import FAMILIES, STATS


@pytest.fixture(scope="session")
def fuzz_cases(request):
    """Inputs per reader when set (``--fuzz-cases`` / ``DISTILLED_UNETS_FUZZ_CASES``), else None: each reader's
    ``ci_cases``."""
    return _option(request.config, "--fuzz-cases", "DISTILLED_UNETS_FUZZ_CASES")


def _option(config, name: str, env: str):
    v = config.getoption(name)
    if v is None and os.environ.get(env):
        v = int(os.environ[env])
    return v


@pytest.fixture(scope="session")
def fuzz_seed(request) -> int:
    return _option(request.config, "--fuzz-seed", "DISTILLED_UNETS_FUZZ_SEED") or 0


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not STATS:
        return
    tr = terminalreporter
    tr.section("fuzz: inputs per reader")
    width = max(len(n) for n in STATS)
    tr.write_line(f"{'reader':<{width}}  inputs  typed errors  working loads  failed")
    total = 0
    for name in sorted(STATS):
        c = STATS[name]
        n = sum(c.values())
        total += n
        tr.write_line(f"{name:<{width}}  {n:>6}  {c['typed']:>12}  {c['working']:>13}  {c['failed']:>6}")
    tr.write_line(f"{'all readers':<{width}}  {total:>6}")
    path = config.getoption("--fuzz-report")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"readers": {k: dict(v) for k, v in sorted(STATS.items())},
                       "mutations": {k: dict(v) for k, v in sorted(FAMILIES.items())}}, f, indent=1, sort_keys=True)


@pytest.fixture(scope="session", autouse=True)
def _release_cached_models():
    """The node readers keep their tiny ModelPatchers cached for the session; release them at its end, while
    ComfyUI's modules are alive (collected at interpreter shutdown, ComfyUI 0.3.64's ``ModelPatcher.__del__``
    finds its modules torn down and prints "Exception ignored ... ON_DETACH")."""
    yield
    import gc
    import sys

    readers = sys.modules.get(__package__ + "._node_readers")
    if readers is not None:
        readers.tiny.cache_clear()
        readers._base_weights.cache_clear()
    gc.collect()
