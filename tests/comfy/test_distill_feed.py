# ruff: noqa: T201  (the data-wait and held-out figures are printed; see them with -s)
"""The engine fed from a streamed dataset (models/students/distill/: the sample index, the prefetch thread, the
held-out split) on ComfyUI's own UNet: a run that reads ahead equals the run that reads in the step loop bit for
bit (losses and final weights), also when resumed from a checkpoint; the held-out samples of Load Distillation
Dataset's split are never drawn for training and the report gives their error before and after. Tiny widths, CPU,
seeded; the same under torchrun is tests/comfy/test_distill_feed_trainer.py."""

from __future__ import annotations

import functools
import re

import pytest

from ..unit.test_distill_datasets import write_dataset
from . import test_distill as TD
from .test_distill import distiller, same

env, models, node_env = TD.env, TD.models, TD.node_env  # the tiny teacher and students of test_distill.py


@pytest.fixture(scope="module")
def streamed(env, models, tmp_path_factory):
    """A Save Training Dataset folder (10 samples, shards of 3) opened with the teacher's own preparation."""
    from distilled_unets.models.students.distill.datasets import ShardedDataset
    from distilled_unets.nodes.host.samples import prepare_sample

    teacher = models[0]
    folder = tmp_path_factory.mktemp("feed") / "data"
    write_dataset(folder, [(8, 8)] * 10, shard_size=3, tokens=8, width=768, seed=4)
    return ShardedDataset(str(folder), functools.partial(prepare_sample, teacher.model), max_open=1)


def test_reading_ahead_gives_the_run_of_reading_in_the_loop_bit_for_bit(env, models, streamed, tmp_path):
    teacher, student, _, held = models
    assert streamed.indexed
    kw = dict(steps=5, grad_accum=2, ema_decay=0.9, seed=5, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    runs = {}
    for depth in (0, 3):
        d = distiller(env, teacher, student, streamed, held, **kw)
        d.prefetch = depth
        runs[depth] = (d.run(), list(d.data_waits))
    (plain, waits0), (ahead, waits3) = runs[0], runs[3]
    assert ahead.losses == plain.losses and ahead.parts == plain.parts
    assert same(ahead.state_dict, plain.state_dict)
    assert ahead.heldout_curve == plain.heldout_curve
    assert len(waits0) == len(waits3) == 5 and all(w >= 0 for w in waits0 + waits3)
    line = next(x for x in ahead.report if x.startswith("data: the steps waited"))
    assert "read 3 micro-batch(es) ahead" in line
    print(f"\n{line}\n{next(x for x in plain.report if x.startswith('data: '))}")
    # a checkpoint of the plain run, resumed reading ahead: the uninterrupted run, bit for bit
    d = distiller(env, teacher, student, streamed, held, **dict(kw, checkpoint_dir=str(tmp_path / "again")))
    d.prefetch = 2
    resumed = d.run(resume=plain.checkpoints[0])
    assert resumed.resumed_from == 2 and resumed.losses == plain.losses
    assert same(resumed.state_dict, plain.state_dict)


def test_a_read_error_ahead_stops_the_run_at_that_step(env, models, streamed, monkeypatch):
    """An error while reading ahead (a shard truncated mid-run) is raised by the step that needed those samples,
    after the steps before it ran; the reading thread ends with the run."""
    import threading

    from distilled_unets.models.students.distill.datasets import DatasetError

    teacher, student, _, held = models
    d = distiller(env, teacher, student, streamed, None, steps=4)
    real, steps = d.host_batch, []

    def host_batch(step, micro):
        if step == 2:
            raise DatasetError("the shard is shorter than when the dataset was opened", "restore it")
        return real(step, micro)

    d.host_batch = host_batch
    with pytest.raises(DatasetError, match="shorter"):
        d.run(on_step=lambda step, terms, applied: steps.append(step))
    assert steps == [1, 2]
    assert not any(t.name == "distilled_unets data" for t in threading.enumerate())


def test_the_loader_split_is_never_trained_on_and_the_report_gives_its_error(node_env, tmp_path, monkeypatch):
    import folder_paths
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes import datasets as DN

    from .test_distill_nodes import captions, executor_call, latent_list

    N, teacher, _, bk_small, _, _ = node_env
    root = tmp_path / "datasets"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "datasets", ([str(root)], set()))
    from ..layouts import write_training_dataset

    write_training_dataset(root / "split", latent_list(12), captions(12), shard_size=5)
    drawn = []
    real_draw = D.Distiller.draw

    def draw(self, step, micro):
        out = real_draw(self, step, micro)
        drawn.extend(out[0].tolist())
        return out

    monkeypatch.setattr(D.Distiller, "draw", draw)
    data = DN.LoadDistillationDataset.execute(["split"], None, [0.2]).args[0]
    assert data.heldout_fraction == 0.2
    _, loss_map, report = executor_call(N, bk_small, teacher, data=data, steps=8, batch_size=2)
    held = D.heldout_indices(12, 0.2)
    print(f"\nheld out {held}; drawn {sorted(set(drawn))}\n{report}")
    assert len(held) == 2 and drawn and not set(drawn) & set(held)
    assert set(drawn) == set(range(12)) - set(held)  # 8 steps x 2 = more than an epoch of the 10 others
    assert "held-out samples: 2 of 12 samples" in report and "never trained on" in report
    assert "training data: 10 of 12 samples in 3 shards (split)" in report
    m = re.search(r"held-out output-KD error \(MSE student vs teacher output\): ([0-9.]+) -> ([0-9.]+)", report)
    assert m and float(m.group(2)) < float(m.group(1))
    assert len(loss_map["heldout"]) == 2  # before and after
    # the same split from the loader whatever the run's own seed; 0 holds nothing out
    drawn.clear()
    _, _, report = executor_call(N, bk_small, teacher, data=data, steps=2, batch_size=2, seed=9)
    assert "held-out samples: 2 of 12 samples" in report and not set(drawn) & set(held)
    none = DN.LoadDistillationDataset.execute(["split"], None, [0.0]).args[0]
    _, _, report = executor_call(N, bk_small, teacher, data=none, steps=1)
    assert "held-out samples: none (heldout_fraction 0" in report
    with pytest.raises(D.DistillError, match="heldout_fraction") as e:
        DN.LoadDistillationDataset.execute(["split"], None, [1.5])
    assert "[LoadDistillationDataset, input 'heldout_fraction']" in str(e.value)
