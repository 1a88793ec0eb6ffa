"""Every host-free reader of the pack survives fuzzing: each mutated input is a typed error naming the file or a
working load; never a raw exception, a hang, an absurd allocation or code run (``_harness.classify``)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from . import _readers  # noqa: F401  (registers the readers)
from ._harness import REGISTRY, STATS, CaseFailure, classify, run_case

HOST_FREE = sorted(n for n, r in REGISTRY.items() if not r.host)


def fuzz(reader, variants, workdir, cases: int, seed_: int, place=None) -> None:
    """``cases`` inputs through ``reader``, drawn by Hypothesis from ``seed_``. Every case runs; the failures are
    listed at the end, each with the draws that made its input (no shrinking)."""
    counter = itertools.count()
    failures: list[str] = []

    @seed(seed_)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.data())
    def one(data):
        try:
            run_case(reader, data.draw, variants, workdir, next(counter), place)
        except CaseFailure as e:
            failures.append(str(e))

    before = STATS[reader.name].copy()
    one()
    ran = STATS[reader.name] - before
    if failures:
        pytest.fail(f"{len(failures)} of {sum(ran.values())} inputs failed:\n\n" + "\n\n".join(failures[:20]),
                    pytrace=False)
    assert ran["typed"] + ran["working"] == sum(ran.values()) > 0
    if cases >= 50:  # the mutations reach both ends: refusals, and loads that work
        assert ran["typed"] and ran["working"], dict(ran)


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
    """The unmutated inputs load and work: the harness's 'working' outcome is real."""
    from ._harness import copy_input

    for variant, src in valid(name).items():
        assert classify(REGISTRY[name], copy_input(src, tmp_path / f"{variant}-{src.name}")) == "working", variant


@pytest.mark.parametrize("name", HOST_FREE)
def test_reader_survives_fuzzing(name, valid, tmp_path, fuzz_cases, fuzz_seed):
    fuzz(REGISTRY[name], valid(name), tmp_path, fuzz_cases[0], fuzz_seed)
