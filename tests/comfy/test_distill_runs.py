# ruff: noqa: T201  (the hashing figures are printed; see them with -s)
"""The headless trainer (tools/distill.py) over a run measured in days: one run per --out (run.json; another run,
an --out that is a file, refused), bounded disk (--keep-checkpoints, the disk check), true dataset identity (an
edited shard named on resume), the container's memory limit, evaluation (eval.csv, student-best) and TensorBoard
at one and two processes.

Tiny random UNets and a dataset folder under tmp_path (the fixtures of test_distill_trainer.py); in-process runs
where no launcher is needed, one torchrun launch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import namedtuple

import pytest
import torch

from ..unit.test_distill_datasets import write_dataset
from .test_distill_trainer import (
    bit_identical,
    launch,
    losses,
    ok,
    student,
    torchrun,
    write_run_files,
)
from .test_distill_trainer import trainer_args as trainer_args


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_path):
    """The files of test_distill_trainer.py (a tiny teacher and student, a Save Training Dataset folder)."""
    return write_run_files(tmp_path_factory.mktemp("runs"), comfyui_path)


@pytest.fixture
def inproc():
    """``distill.main(argv)`` in this process (logging left to pytest)."""
    import distill

    return lambda args: distill.main(args, own_logging=False)


def snapshot(folder) -> dict:
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def args_for(files, out, *extra, steps=2, batch=4, every=0, data=None):
    """trainer_args with a short run; ``every`` 0: no checkpoints."""
    a = trainer_args(files, out, *extra, batch=batch, steps=steps, data=data)
    a[a.index("--checkpoint-every") + 1] = str(every)
    return a


def test_an_out_that_is_a_file_is_refused(files, inproc, tmp_path, caplog):
    f = tmp_path / "not-a-folder"
    f.write_text("mine")
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, f)) == 2
    assert "[tools/distill.py, input '--out'] the output folder names an existing file" in caplog.text
    assert f.read_text() == "mine"


def test_another_run_into_a_finished_runs_folder_is_refused_and_nothing_changes(files, inproc, tmp_path, caplog):
    """The issue's case: a finished run that wrote no checkpoint, then batch 1 / lr 1e-4 into its folder."""
    out = tmp_path / "first"
    assert inproc(args_for(files, out)) == 0
    before = snapshot(out)
    assert "run.json" in before and "losses.csv" in before and "student-00002.safetensors" in before
    other = args_for(files, out, "--lr", "1e-4", batch=1)
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(other) == 2
    assert "the output folder holds another run (run.json)" in caplog.text
    assert "--batch-size x processes (4 -> 1)" in caplog.text and "--lr (5e-05 -> 0.0001)" in caplog.text
    assert snapshot(out) == before
    # a folder from before run.json: judged by its student file's recorded settings
    os.remove(out / "run.json")
    before = snapshot(out)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(other) == 2
    assert "holds another run (student-00002.safetensors)" in caplog.text and "learning_rate" in caplog.text
    assert snapshot(out) == before
    # a bare losses.csv of an unknown run
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "losses.csv").write_text("step,loss\n1,0.5\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, bare)) == 2
    assert "(losses.csv)" in caplog.text and "settings were not recorded" in caplog.text
    assert snapshot(bare) == {"losses.csv": b"step,loss\n1,0.5\n"}


def test_old_checkpoints_are_deleted_and_a_run_that_cannot_fit_is_refused(files, inproc, tmp_path, caplog,
                                                                          monkeypatch):
    out = tmp_path / "bounded"
    with caplog.at_level(logging.INFO, logger="distilled_unets"):
        assert inproc(args_for(files, out, "--keep-checkpoints", "2", steps=6, every=2)) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == [
        "checkpoint_0000004.safetensors", "checkpoint_0000006.safetensors"]
    line = next(r.message for r in caplog.records if r.message.startswith("disk: "))
    print(f"\n{line}")
    assert "one checkpoint weighs" in line and "the run holds at most 3 checkpoints" in line
    assert "free on the disk" in line
    # the same run into a fresh folder on a disk with 1 MB free: refused before anything of the run is written
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 20))
    small = tmp_path / "small"
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, small, "--keep-checkpoints", "2", steps=6, every=2)) == 2
    assert "[tools/distill.py, input '--out'] the run would not fit on disk: one checkpoint weighs" in caplog.text
    assert "1.00 MiB is free" in caplog.text and "--keep-checkpoints 1" in caplog.text
    assert not small.exists()  # nothing written


def test_an_edited_shard_is_named_when_the_run_resumes(files, inproc, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    out = tmp_path / "run"
    assert inproc(args_for(files, out, steps=2, every=2, data=str(data))) == 0
    # the shard's content changes in place (same name; as a user rewriting a dataset would)
    path = data / "shard_0001.pkl"
    d = torch.load(path, weights_only=True)
    d["latents"][0]["samples"].mul_(0.5)
    with open(path, "wb") as f:
        torch.save(d, f)
    longer = args_for(files, out, steps=4, every=2, data=str(data))
    with caplog.at_level(logging.INFO, logger="distilled_unets"):
        assert inproc(longer) == 2
    assert "hashed 1 shard file(s)" in caplog.text  # the others came from the cache (size and mtime unchanged)
    assert "--data: shard_0001.pkl changed" in caplog.text and "put the data and settings back" in caplog.text
    assert not (out / "student-00004.safetensors").exists()


def test_a_container_memory_limit_is_seen_before_training(files, inproc, tmp_path, caplog, monkeypatch):
    from distilled_unets.models.students.distill import resources

    root = tmp_path / "machine"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text("0::/job\n")
    (root / "proc" / "self" / "mountinfo").write_text("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    (root / "sys" / "fs" / "cgroup" / "job").mkdir(parents=True)
    (root / "sys" / "fs" / "cgroup" / "job" / "memory.max").write_text(str(4 << 20))
    (root / "sys" / "fs" / "cgroup" / "job" / "memory.current").write_text(str(1 << 20))
    monkeypatch.setattr(resources, "ROOT", str(root))
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, out)) == 2
    assert "[tools/distill.py, input '--batch-size'] distillation needs ~" in caplog.text
    assert "0.00 GiB is free under the process's cgroup v2 limit (memory.max 0.00 GiB" in caplog.text
    assert not list(out.glob("student-*")) and not list(out.glob("checkpoint*"))


def test_tensorboard_missing_is_one_line_before_anything(files, inproc, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, tmp_path / "tb", "--tensorboard", str(tmp_path / "tb"))) == 2
    assert "--tensorboard needs TensorBoard: pip install tensorboard" in caplog.text
    assert not (tmp_path / "tb").exists()


def test_a_best_metric_the_run_does_not_measure_is_refused(files, inproc, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(args_for(files, tmp_path / "a", "--best-metric", "heldout_kd")) == 2
        assert inproc(args_for(files, tmp_path / "b", "--best-metric", "fid", "--heldout-data", files["data"])) == 2
    assert "input '--best-metric'] the best metric is 'heldout_kd' but nothing is evaluated" in caplog.text
    assert "the best metric 'fid' is not one the evaluation gives (heldout_kd)" in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_evaluation_best_and_tensorboard_at_one_and_two_processes(files, inproc, tmp_path):
    from distilled_unets.models.students.distill.runs import read_csv
    from distilled_unets.nodes.host.unet import load_distilled_unet
    from safetensors import safe_open
    from safetensors.torch import load_file

    held = tmp_path / "held"
    write_dataset(str(held), [(8, 8)] * 2, shard_size=2, tokens=8, width=768, seed=9)
    extra = ("--heldout-data", str(held), "--eval-every", "2", "--best-metric", "heldout_kd")
    one, two = tmp_path / "one", tmp_path / "two"
    assert inproc(args_for(files, one, *extra, "--tensorboard", str(one / "tb"), steps=4, every=2)) == 0
    ok(launch(torchrun(2, args_for(files, two, *extra, "--tensorboard", str(two / "tb"), steps=4, every=2,
                                   batch=2))))
    ev1, ev2 = read_csv(one / "eval.csv"), read_csv(two / "eval.csv")
    print(f"\neval.csv, 1 process: {ev1}\n          2 processes: {ev2}")
    assert [r["step"] for r in ev1] == [0, 2, 4] == [r["step"] for r in ev2]
    for a, b in zip(ev1, ev2):
        assert a["heldout_kd"] == pytest.approx(b["heldout_kd"], rel=1e-5)
    # the best student: loadable, its step the best evaluation's
    best = min(ev1, key=lambda r: r["heldout_kd"])
    for out in (one, two):
        with safe_open(str(out / "student-best.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["distilled_unets.training"])
        assert meta["best"]["step"] == best["step"] and meta["best"]["metric"] == "heldout_kd"
        load_distilled_unet(str(out / "student-best.safetensors"))
    if best["step"] == 4:  # the final weights were the best: the two files hold the same weights
        sd = load_file(str(one / "student-best.safetensors"))
        bit_identical(student(one, steps=4), {k[len("model.diffusion_model."):]: v for k, v in sd.items()
                                              if k.startswith("model.diffusion_model.")})
    # TensorBoard, rank 0 only: the loss and its terms per step as in losses.csv, the rest of the scalars
    for out in (one, two):
        assert len(os.listdir(out / "tb")) == 1
        sc, rows = scalars(out / "tb"), losses(out)
        assert [v for _, v in sc["loss/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
        assert [v for _, v in sc["loss/task"]] == pytest.approx([r["task"] for r in rows], rel=1e-6)
        assert [s for s, _ in sc["loss/loss"]] == [1, 2, 3, 4]
        assert [v for _, v in sc["train/learning_rate"]] == pytest.approx([5e-5] * 4)
        assert [v for _, v in sc["train/skipped_steps"]] == [0, 0, 0, 0]
        assert len(sc["throughput/samples_per_s"]) >= 2 and "throughput/samples_per_s_per_process" in sc
        ev = read_csv(out / "eval.csv")
        assert sc["eval/heldout_kd"] == [(r["step"], pytest.approx(r["heldout_kd"], rel=1e-6)) for r in ev]
    # resumed from the 1-process run's step-2 checkpoint: eval.csv and losses.csv as the uninterrupted run's
    res = tmp_path / "resumed"
    assert inproc(args_for(files, res, *extra, "--resume", str(one / "checkpoint_0000002.safetensors"), steps=4,
                           every=2)) == 0
    assert read_csv(res / "eval.csv") == ev1 and losses(res) == losses(one)
