"""Every reader of the pack survives fuzzing: each mutated input is a typed error naming the file (and, behind a
node, the node and the input) or a working load; never a raw exception, a hang, an absurd allocation or code run
(``_harness.classify``). The host-free readers are in ``_readers.py``; those behind the nodes run in a real
ComfyUI (CPU, marked ``host``) and are in ``_node_readers.py``."""

from __future__ import annotations

import pytest

from . import _node_readers, _readers  # noqa: F401  (they register the readers)
from ._harness import REGISTRY, check_valid, fuzz

READERS = [pytest.param(n, marks=pytest.mark.host) if r.host else n for n, r in sorted(REGISTRY.items())]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Each reader's valid inputs, written once."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = REGISTRY[name].make(tmp_path_factory.mktemp("valid"))
        return made[name]
    return get


@pytest.mark.parametrize("name", READERS)
def test_valid_inputs_are_working_loads(name, valid, tmp_path):
    check_valid(REGISTRY[name], valid(name), tmp_path)


@pytest.mark.parametrize("name", READERS)
def test_reader_survives_fuzzing(name, valid, tmp_path, fuzz_cases, fuzz_seed):
    fuzz(REGISTRY[name], valid(name), tmp_path, fuzz_cases or REGISTRY[name].ci_cases, fuzz_seed)
