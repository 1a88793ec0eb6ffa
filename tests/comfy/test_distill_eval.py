# ruff: noqa: T201  (the checkpoint size estimate is printed; see it with -s)
"""Evaluation while distilling, bounded checkpoints and memory checks in the engine (models/students/distill/,
students/eval_hook.py) on ComfyUI's own UNet: tiny random teacher and student, seeded CPU runs.

What is held: an evaluation changes nothing of the training (losses and weights bit-identical with and without
it; the evaluator sees the EMA weights in eval mode); the best evaluation's weights are handed over and equal a
run stopped at that step; evaluations and the best resume with a checkpoint, also one written before
evaluations were recorded; a best metric the evaluation does not give is refused before the first step; only
the newest ``keep_checkpoints`` of the same run are kept; a checkpoint's size is known before it is written;
the memory check sees a container's limit, the processes that share the machine and the best weights kept."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import resources

from .test_distill import STUDENT, TEACHER, distiller, make_data, same


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    from distilled_unets.models.structure.topology import from_comfy_config

    from . import _tiny_models as tm

    return tm, D, from_comfy_config


@pytest.fixture(scope="module")
def models(env):
    tm = env[0]
    return tm.build("sd15", TEACHER, model_channels=32, seed=1), tm.build("sd15", STUDENT, model_channels=32, seed=2)


class Scores:
    """An evaluator giving ``values[step]`` as "score" (higher is better), recording what it was shown."""

    metric_names = ("score",)

    def __init__(self, values):
        self.values, self.calls, self.seen = values, [], {}

    def __call__(self, student, step):
        assert not student.training and not torch.is_grad_enabled()
        self.calls.append(step)
        self.seen[step] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        return {"score": self.values[step]}


def test_evaluation_changes_nothing_and_sees_the_ema_weights(env, models):
    teacher, student = models
    data, _ = make_data(D)
    kw = dict(steps=4, ema_decay=0.9, seed=3)
    plain = distiller(env, teacher, student, data, None, **kw).run()
    ev = Scores({s: float(s) for s in range(5)})
    seen = []
    res = distiller(env, teacher, student, data, None, evaluator=ev, eval_every=1,
                    on_eval=lambda s, m, b: seen.append((s, m, b)), **kw).run()
    assert res.losses == plain.losses and same(res.state_dict, plain.state_dict)
    assert ev.calls == [0, 1, 2, 3, 4] and [s for s, _, _ in seen] == [0, 1, 2, 3, 4]
    assert same(ev.seen[4], res.state_dict)  # the final evaluation saw the EMA weights the run returns
    assert res.evaluations == [{"step": s, "score": float(s)} for s in range(5)]
    assert any("evaluations: 5" in line for line in res.report)


def test_the_best_weights_are_handed_over_and_resume_with_a_checkpoint(env, models, tmp_path):
    teacher, student = models
    data, _ = make_data(D)
    kw = dict(steps=3, ema_decay=0.9, seed=3, eval_every=1, best_metric="score", checkpoint_every=1,
              checkpoint_dir=str(tmp_path), keep_checkpoints=2)
    values = {0: 1.0, 1: 5.0, 2: 2.0, 3: 3.0}
    saved, flags = [], []
    res = distiller(env, teacher, student, data, None, evaluator=Scores(values),
                    on_eval=lambda s, m, b: flags.append(b), save_best=lambda s, st: saved.append((s, st)),
                    **kw).run()
    assert flags == [True, True, False, False] and [s for s, _ in saved] == [0, 1]
    assert res.best == {"metric": "score", "value": 5.0, "step": 1}
    one = distiller(env, teacher, student, data, None, **dict(kw, steps=1, checkpoint_every=0,
                                                              checkpoint_dir=None, eval_every=0, best_metric="")).run()
    assert same(saved[-1][1], one.state_dict)  # the best weights are those of a run stopped at step 1
    # bounded checkpoints: the newest two of this run
    assert sorted(os.listdir(tmp_path)) == ["distill_0000002.safetensors", "distill_0000003.safetensors"]
    assert [os.path.basename(p) for p in res.checkpoints] == sorted(os.listdir(tmp_path))
    # resumed from step 2: the same evaluations, the best kept (step 3 does not beat it, so nothing is handed over)
    saved.clear()
    again = distiller(env, teacher, student, data, None, evaluator=Scores(values),
                      save_best=lambda s, st: saved.append(s), **dict(kw, checkpoint_dir=str(tmp_path / "r"))).run(
        resume=str(tmp_path / "distill_0000002.safetensors"))
    assert again.evaluations == res.evaluations and again.best == res.best and saved == []
    assert same(again.state_dict, res.state_dict)


def test_a_checkpoint_from_before_evaluations_were_recorded_resumes(env, models, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    teacher, student = models
    data, held = make_data(D)
    kw = dict(steps=4, ema_decay=0.9, seed=3, eval_every=2, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    full = distiller(env, teacher, student, data, held, **kw).run()
    assert [e["step"] for e in full.evaluations] == [0, 2, 4] and full.heldout_curve[0][1] == full.heldout_before
    path = str(tmp_path / "distill_0000002.safetensors")
    with safe_open(path, framework="pt") as f:  # as the pack wrote checkpoints before: the held-out curve tensor
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    evals = json.loads(meta.pop("evaluations"))
    for k in ("best", "run"):
        meta.pop(k)
    tensors["history.heldout"] = torch.tensor([[e["step"], e["heldout_kd"]] for e in evals], dtype=torch.float64)
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata=meta)
    again = distiller(env, teacher, student, data, held, **dict(kw, checkpoint_dir=str(tmp_path / "r"))).run(
        resume=old)
    assert again.evaluations == full.evaluations and again.heldout_after == full.heldout_after
    assert same(again.state_dict, full.state_dict)
    # a checkpoint's size is known before it is written (tensors exact, the header estimated)
    d = distiller(env, teacher, student, data, held, **kw)
    for step in (2, 4):
        real = os.path.getsize(tmp_path / f"distill_{step:07d}.safetensors")
        print(f"\ncheckpoint at step {step}: {real} bytes, estimated {d.checkpoint_bytes(step)}")
        assert abs(d.checkpoint_bytes(step) - real) <= 0.01 * real


def test_a_best_metric_the_evaluation_does_not_give_is_refused_before_training(env, models):
    teacher, student = models
    data, held = make_data(D)
    with pytest.raises(D.DistillError, match="'fid' is not one the evaluation gives \\(score\\)") as e:
        distiller(env, teacher, student, data, None, steps=2, evaluator=Scores({}), best_metric="fid")
    assert e.value.input_name == "best_metric"
    with pytest.raises(D.DistillError, match="nothing is evaluated"):
        distiller(env, teacher, student, data, None, steps=2, best_metric="heldout_kd")
    with pytest.raises(D.DistillError, match="'fid' is not one the evaluation gives \\(heldout_kd\\)"):
        distiller(env, teacher, student, data, held, steps=2, best_metric="fid")

    def undeclared(student, step):  # declares nothing: checked at the first evaluation, before the first step
        return {"a": 1.0}

    steps = []
    with pytest.raises(D.DistillError, match="'b' is not among the metrics the evaluation gave \\(a\\)"):
        distiller(env, teacher, student, data, None, steps=2, evaluator=undeclared, best_metric="b").run(
            on_step=lambda *a: steps.append(a))
    assert steps == []


def test_only_this_runs_older_checkpoints_are_deleted(env, models, tmp_path):
    teacher, student = models
    data, _ = make_data(D)
    kw = dict(ema_decay=0.0, seed=3, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    distiller(env, teacher, student, data, None, steps=3, **kw).run()                        # this run, 3 steps
    distiller(env, teacher, student, data, None, steps=1, learning_rate=2e-3, **kw).run()    # another run
    before = sorted(os.listdir(tmp_path))
    assert before == ["distill_0000001.safetensors", "distill_0000001_1.safetensors", "distill_0000002.safetensors",
                      "distill_0000003.safetensors"]
    # the same run again, 2 steps, keep 1: its older checkpoints of earlier steps go, the other run's and the
    # later steps' stay
    res = distiller(env, teacher, student, data, None, steps=2, keep_checkpoints=1, **kw).run()
    left = sorted(os.listdir(tmp_path))
    assert [os.path.basename(p) for p in res.checkpoints] == ["distill_0000002_1.safetensors"]
    assert left == ["distill_0000001_1.safetensors", "distill_0000002.safetensors", "distill_0000002_1.safetensors",
                    "distill_0000003.safetensors"]
    other = D.read_checkpoint_meta(str(tmp_path / "distill_0000001_1.safetensors"))
    assert json.loads(other["config"])["learning_rate"] == 2e-3


def test_the_memory_check_sees_a_container_limit_and_the_local_processes(env, models, tmp_path, monkeypatch):
    teacher, student = models
    data, _ = make_data(D)
    d = distiller(env, teacher, student, data, None, steps=1)
    need = d.estimate_memory().total
    d.check_memory(int(need * 1.5), processes=1)
    with pytest.raises(D.TrainingMemoryError, match="per process, x 2 processes on this machine") as e:
        d.check_memory(int(need * 1.5), processes=2)
    assert "fewer processes on this machine" in str(e.value)
    # the best weights a run keeps (one copy, in host memory) count on the CPU
    keeper = distiller(env, teacher, student, data, None, steps=1, evaluator=Scores({}), best_metric="score",
                       save_best=lambda *a: None)
    extra = keeper.best_copy_bytes()
    assert extra == sum(v.numel() * 4 for v in student.model.diffusion_model.state_dict().values())
    keeper.check_memory(int((need + extra) / 0.9) + 1, processes=1)
    with pytest.raises(D.TrainingMemoryError, match="the best evaluation's weights"):
        keeper.check_memory(int((need + extra // 2) / 0.9), processes=1)
    # a container whose cgroup v2 limit leaves less than the run needs: the default reading sees it
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/ctr\n")
    (tmp_path / "proc" / "self" / "mountinfo").write_text("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    limit = tmp_path / "sys" / "fs" / "cgroup" / "ctr"
    limit.mkdir(parents=True)
    (limit / "memory.max").write_text(str(need // 2))
    (limit / "memory.current").write_text("0")
    monkeypatch.setattr(resources, "ROOT", str(tmp_path))
    with pytest.raises(D.TrainingMemoryError, match="cgroup v2 limit \\(memory.max") as e:
        d.check_memory(processes=1)
    assert e.value.free_bytes == need // 2 and "higher memory limit for the container" in str(e.value)
    shutil.rmtree(tmp_path / "proc")
