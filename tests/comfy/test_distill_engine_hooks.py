"""What the engine offers a headless trainer (models/students/distill/): the loss terms of every step as it happens
(``on_step``), a checkpoint's history and its differences from a run's settings, and a checkpoint at the last
step resuming into the run's result."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import checkpoints as C

from .test_distill import LR, STUDENT, TEACHER, distiller, make_data, same


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    from distilled_unets.models.structure.topology import from_comfy_config

    from . import _tiny_models as tm

    return tm, D, from_comfy_config


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    tm = env[0]
    teacher = tm.build("sd15", TEACHER, model_channels=32, seed=1)
    student = tm.build("sd15", STUDENT, model_channels=32, seed=2)
    data, _ = make_data(D)
    folder = tmp_path_factory.mktemp("hooks")
    kw = dict(steps=4, ema_decay=0.9, checkpoint_every=2, checkpoint_dir=str(folder), seed=7)
    seen = []
    res = distiller(env, teacher, student, data, None, **kw).run(
        on_step=lambda step, terms, applied: seen.append((step, dict(terms), applied)))
    return teacher, student, data, kw, res, seen


def test_on_step_gives_every_step_its_terms(run):
    *_, res, seen = run
    assert [s for s, _, _ in seen] == [1, 2, 3, 4] and all(a for _, _, a in seen)
    assert [t["loss"] for _, t, _ in seen] == res.losses
    for k, v in res.parts.items():
        assert [t[k] for _, t, _ in seen] == v


def test_read_history_is_the_run_up_to_the_checkpoint(run):
    *_, res, _ = run
    losses, parts, skipped = C.read_history(res.checkpoints[0])
    assert losses == res.losses[:2] and skipped == []
    assert parts == {k: v[:2] for k, v in res.parts.items()}


def test_differences_name_the_settings_and_the_global_batch(run):
    *_, kw, res, _ = run
    meta = D.read_checkpoint_meta(res.checkpoints[0])
    cfg = D.DistillConfig(**kw, batch_size=2, learning_rate=LR)
    assert C.differences(meta, cfg, 2) == []
    assert C.differences(meta, dataclasses.replace(cfg, steps=10), 2) == []  # more steps: the same run, longer
    assert C.differences(meta, dataclasses.replace(cfg, learning_rate=1e-4), 4) == ["global batch (2 -> 4)",
                                                                                    "learning_rate"]
    assert json.loads(meta["config"])["seed"] == 7


def test_a_checkpoint_at_the_last_step_resumes_into_the_result(env, run):
    teacher, student, data, kw, res, _ = run
    again = distiller(env, teacher, student, data, None, **kw).run(resume=res.checkpoints[-1])
    assert again.resumed_from == 4 and again.steps_done == 4 and again.samples_seen == 0
    assert again.losses == res.losses and same(again.state_dict, res.state_dict)
    with pytest.raises(D.CheckpointError, match="set steps to 4 or more"):
        distiller(env, teacher, student, data, None, **dict(kw, steps=3)).run(resume=res.checkpoints[-1])
