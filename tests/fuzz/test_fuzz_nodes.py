"""The readers behind the nodes survive fuzzing in a real ComfyUI (CPU): each mutated input is a typed error naming
the node, the input and the file, or a working load (a forward pass, a LoRA that patches, a batch, a resumed run,
VGG features); never a raw exception, a hang, an absurd allocation or code run."""

from __future__ import annotations

import pytest

from . import _node_readers  # noqa: F401  (registers the readers)
from ._harness import REGISTRY, check_valid, fuzz

NODE_READERS = sorted(n for n, r in REGISTRY.items() if r.host)
pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = REGISTRY[name].make(tmp_path_factory.mktemp("valid"))
        return made[name]
    return get


@pytest.mark.parametrize("name", NODE_READERS)
def test_valid_inputs_are_working_loads(name, valid, tmp_path):
    check_valid(REGISTRY[name], valid(name), tmp_path)


@pytest.mark.parametrize("name", NODE_READERS)
def test_reader_survives_fuzzing(name, valid, tmp_path, fuzz_cases, fuzz_seed):
    fuzz(REGISTRY[name], valid(name), tmp_path, fuzz_cases or REGISTRY[name].ci_cases, fuzz_seed)
