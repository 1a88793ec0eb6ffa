"""Every host-free reader of the pack survives fuzzing: each mutated input is a typed error naming the file or a
working load; never a raw exception, a hang, an absurd allocation or code run (``_harness.classify``)."""

from __future__ import annotations

import pytest

from . import _readers  # noqa: F401  (registers the readers)
from ._harness import REGISTRY, check_valid, fuzz

HOST_FREE = sorted(n for n, r in REGISTRY.items() if not r.host)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = REGISTRY[name].make(tmp_path_factory.mktemp("valid"))
        return made[name]
    return get


@pytest.mark.parametrize("name", HOST_FREE)
def test_valid_inputs_are_working_loads(name, valid, tmp_path):
    check_valid(REGISTRY[name], valid(name), tmp_path)


@pytest.mark.parametrize("name", HOST_FREE)
def test_reader_survives_fuzzing(name, valid, tmp_path, fuzz_cases, fuzz_seed):
    fuzz(REGISTRY[name], valid(name), tmp_path, fuzz_cases or REGISTRY[name].ci_cases, fuzz_seed)
