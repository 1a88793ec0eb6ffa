# ruff: noqa: T201  (the figures are printed; see them with -s)
"""tools/distill.py reading ahead (``--prefetch``, the default) against reading in the step loop (``--prefetch 0``),
with a held-out split of the dataset (``--heldout-fraction``), in one process and under torchrun with two (gloo,
CPU): bit for bit the same run at the same scale, the stated 1e-5 across scales (tests/comfy/test_distill_trainer.py
says why), the same held-out samples and error at both, and a checkpoint that resumes across world sizes."""

from __future__ import annotations

import logging
import re

import pytest

from . import test_distill_trainer as T
from .test_distill_trainer import (
    bit_identical,
    launch,
    losses,
    ok,
    same_losses,
    same_weights,
    student,
    torchrun,
    trainer_args,
)

files, inproc = T.files, T.inproc  # the module fixture of tiny models and a dataset; distill.main in this process

HELD = ["--heldout-fraction", "0.125"]  # 2 of the 16 samples
HELDOUT_LINE = re.compile(r"held-out output-KD error \(MSE student vs teacher output\): ([0-9.]+) -> ([0-9.]+)")


def heldout(text: str) -> tuple[float, float]:
    m = HELDOUT_LINE.search(text)
    assert m, text[-3000:]
    return float(m.group(1)), float(m.group(2))


@pytest.fixture(scope="module")
def two(files):
    """2 processes x batch 2, reading in the loop and reading ahead (torchrun, gloo)."""
    out = {}
    for depth in ("0", "2"):
        path = files["root"] / f"feed2_{depth}"
        out[depth] = (path, ok(launch(torchrun(2, trainer_args(files, path, *HELD, "--prefetch", depth, batch=2)))))
    return out


def test_reading_ahead_is_the_plain_run_in_one_process_and_in_two(files, two, inproc, caplog):
    one = {}
    for depth in ("0", "2"):
        path = files["root"] / f"feed1_{depth}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="distilled_unets"):
            assert inproc(trainer_args(files, path, *HELD, "--prefetch", depth)) == 0
        one[depth] = (path, caplog.text)
    for runs, what in ((one, "1 process"), (two, "2 processes")):
        (plain, plain_log), (ahead, ahead_log) = runs["0"], runs["2"]
        bit_identical(student(ahead), student(plain))
        same_losses(losses(ahead), losses(plain), rel=0)
        assert heldout(ahead_log) == heldout(plain_log)
        assert "held out: 2 of 16 samples (12 %), chosen by seed 0: never trained on" in ahead_log, what
        assert "read 2 micro-batch(es) ahead" in ahead_log and "read in the step loop" in plain_log
        print(f"\n{what}: " + next(x for x in ahead_log.splitlines() if "data: the steps waited" in x))
    # the same split and held-out error at both scales; the runs agree within the stated margins
    (b1, a1), (b2, a2) = heldout(one["2"][1]), heldout(two["2"][1])
    print(f"held-out error: 1 process {b1} -> {a1}, 2 processes {b2} -> {a2}")
    assert b1 == pytest.approx(b2, abs=1e-5) and a1 == pytest.approx(a2, abs=2e-5) and a1 < b1
    same_losses(losses(two["2"][0]), losses(one["2"][0]))
    same_weights(student(two["2"][0]), student(one["2"][0]), "reading ahead, 2 processes vs 1")


def test_a_checkpoint_read_ahead_resumes_across_world_sizes(files, two, inproc):
    """The 2-process run's checkpoint resumed in one process, reading ahead: the 1-process run's result."""
    out = files["root"] / "feed_resume21"
    ref = files["root"] / "feed1_2"
    if not ref.exists():
        assert inproc(trainer_args(files, ref, *HELD)) == 0
    assert inproc(trainer_args(files, out, *HELD, "--resume", str(two["0"][0] / "checkpoint_0000004.safetensors"))) == 0
    same_losses(losses(out), losses(ref))
    same_weights(student(out), student(ref), "2-process checkpoint (read in the loop) resumed in 1 reading ahead")


def test_bad_feed_flags_are_refused_before_the_models_load(files, inproc, caplog, tmp_path):
    for extra, text in ((["--heldout-fraction", "1.5"], "--heldout-fraction is 1.5"),
                        (["--heldout-data", files["data"], "--heldout-fraction", "0.1"],
                         "both --heldout-data and --heldout-fraction are given"),
                        (["--prefetch", "-1"], "--prefetch is -1"), (["--open-shards", "0"], "--open-shards is 0")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="distilled_unets"):
            assert inproc(trainer_args(files, tmp_path / "x", *extra)) == 2
        assert text in caplog.text and "Fix:" in caplog.text, caplog.text
    assert not (tmp_path / "x").exists()
