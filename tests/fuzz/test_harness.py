"""The harness catches what it is there to catch: readers made to fail each way are reported as that failure."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from distilled_unets.models.errors import WeightFileError

from . import _harness as H
from . import _mutate as M


def _reader(load, works=lambda r: None):
    return H.Reader("fake", lambda folder: {}, load, works, H.by_kind())


@pytest.fixture
def case(tmp_path):
    p = tmp_path / "case00000-x.safetensors"
    p.write_bytes(b"x")
    return p


def _outcome(reader, case) -> str:
    try:
        return H.classify(reader, case)
    except H.CaseFailure as e:
        return str(e)


def test_typed_errors_and_working_loads_are_the_two_outcomes(case):
    assert _outcome(_reader(lambda p: 1), case) == "working"
    assert _outcome(_reader(lambda p: _raise(WeightFileError("bad", "fix", path=str(p)))), case) == "typed"


@pytest.mark.parametrize("load,works,want", [
    (lambda p: {}["k"], lambda r: None, "raw exception: KeyError"),
    (lambda p: _raise(WeightFileError("bad", "fix")), lambda r: None, "does not name the file"),
    (lambda p: 1, lambda r: _raise(AssertionError("no forward")), "does not work: no forward"),
    (lambda p: time.sleep(5), lambda r: None, "hang"),
    (lambda p: torch.empty(4 << 30, dtype=torch.uint8), lambda r: None, "memory"),  # 4 GiB, over the 1 GiB cap
    (lambda p: _typed_from(lambda: torch.empty(4 << 30, dtype=torch.uint8), p), lambda r: None, "memory"),
    (lambda p: pickle.loads(pickle.dumps(M.RunsCode())), lambda r: None, "ran code"),
], ids=["raw", "unnamed", "not working", "hang", "memory", "memory behind a typed error", "code"])
def test_every_kind_of_failure_is_reported(case, monkeypatch, load, works, want):
    monkeypatch.setattr(H, "CASE_SECONDS", 0.5)
    monkeypatch.setattr(H, "CASE_MEMORY", 1 << 30)
    assert want in _outcome(_reader(load, works), case)


def _raise(e):
    raise e


def _typed_from(fn, p):
    """A reader that turns whatever it meets into a typed error (an allocation beyond the cap included)."""
    try:
        fn()
    except Exception as e:
        raise WeightFileError(f"cannot be read ({type(e).__name__})", "fix", path=str(p)) from e


def test_a_node_reader_must_name_its_node_and_input(case):
    r = H.Reader("fake", lambda folder: {}, lambda p: _raise(WeightFileError("bad", "fix", path=str(p), node="Other",
                                                                            input_name="x")),
                 lambda res: None, H.by_kind(), names=(("Node", "input"),))
    assert "names node 'Other'" in _outcome(r, case)
