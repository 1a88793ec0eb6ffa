# ruff: noqa: T201  (the estimates are printed; see them with -s)
"""The engine's memory options on ComfyUI's own UNet (models/students/distill/): selective recompute gives the run
without it bit for bit (losses and final weights, fp32 and bf16 autocast, with accumulation and every loss
term); the EMA kept on the host and updated by a host thread gives the device EMA bit for bit; an EMA every N
steps resumes from a checkpoint between two of its updates into the uninterrupted run's result; the estimate
knows both and the memory refusal names them. Tiny widths, CPU, seeded. (Where these sit against diffusers' KD
step: bench/bench_distill.py, pack-lowmem.)"""

from __future__ import annotations

import threading

import pytest

from . import test_distill as TD
from .test_distill import distiller, same

env, models = TD.env, TD.models  # the tiny teacher and student of test_distill.py


@pytest.mark.parametrize("cfg", [dict(features="stages+mid", grad_accum=2, ema_decay=0.9),
                                 dict(precision="bf16", batch_size=3)], ids=["fp32+accumulation", "bf16"])
def test_selective_recompute_is_the_plain_run_bit_for_bit(env, models, cfg):
    teacher, student, data, held = models
    plain = distiller(env, teacher, student, data, held, steps=3, **cfg).run()
    selective = distiller(env, teacher, student, data, held, steps=3, selective_recompute=True, **cfg).run()
    assert selective.losses == plain.losses and selective.parts == plain.parts
    assert same(selective.state_dict, plain.state_dict)
    assert selective.heldout_curve == plain.heldout_curve


def test_the_ema_on_the_host_thread_is_the_device_ema_bit_for_bit(env, models, tmp_path):
    teacher, student, data, held = models
    kw = dict(steps=5, ema_decay=0.9, seed=2)
    device_ema = distiller(env, teacher, student, data, held, **kw).run()
    d = distiller(env, teacher, student, data, held, ema_on_host=True, checkpoint_every=2,
                  checkpoint_dir=str(tmp_path), **kw)
    d.ema_thread = True  # what a GPU run does: copies, then a host thread's update
    host_ema = d.run()
    assert host_ema.losses == device_ema.losses and same(host_ema.state_dict, device_ema.state_dict)
    assert host_ema.heldout_after == device_ema.heldout_after
    assert not any(t.name.startswith("distilled_unets ema") for t in threading.enumerate())
    # its checkpoints hold the EMA as it was at their step: resuming gives the same result
    again = distiller(env, teacher, student, data, held, ema_on_host=True, **kw)
    again.ema_thread = True
    resumed = again.run(resume=host_ema.checkpoints[1])
    assert resumed.resumed_from == 4 and same(resumed.state_dict, device_ema.state_dict)


def test_an_ema_every_3_steps_resumes_between_its_updates(env, models, tmp_path):
    teacher, student, data, held = models
    kw = dict(steps=7, ema_decay=0.9, ema_every=3, seed=4, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    full = distiller(env, teacher, student, data, held, **kw).run()
    every1 = distiller(env, teacher, student, data, held, **dict(kw, ema_every=1, checkpoint_every=0)).run()
    assert full.losses == every1.losses, "the EMA never feeds back into training"
    assert not same(full.state_dict, every1.state_dict)  # other EMA maths, the same raw weights
    resumed = distiller(env, teacher, student, data, held, **dict(kw, checkpoint_dir=str(tmp_path / "r"))).run(
        resume=full.checkpoints[0])  # step 4: one step after the EMA's update at 3
    assert resumed.resumed_from == 4 and resumed.losses == full.losses
    assert same(resumed.state_dict, full.state_dict)
    from distilled_unets.models.students.distill import checkpoints as C

    meta = C.read_checkpoint_meta(full.checkpoints[0])
    other = distiller(env, teacher, student, data, held, **dict(kw, ema_every=2)).cfg
    assert C.differences(meta, other, 2) == ["ema_every"]


def test_the_estimate_and_the_refusal_know_the_memory_options(env, models):
    from distilled_unets.models.students import distill as D

    teacher, student, data, held = models
    d = distiller(env, teacher, student, data, held, steps=1, ema_decay=0.9, batch_size=4)
    est = d.estimate_memory()
    sel = distiller(env, teacher, student, data, held, steps=1, ema_decay=0.9, batch_size=4,
                    selective_recompute=True).estimate_memory()
    full = est.with_(checkpointing=True)
    print(f"\nnone: {est.describe()}\nselective: {sel.describe()}\nfull: {full.describe()}")
    assert full.activations < sel.activations < est.activations and sel.selective and "selective" in sel.describe()
    assert est.with_(selective=True).total == sel.total
    host = est.with_(ema_on_host=True)
    assert host.ema == 0 and host.host == 2 * est.ema and host.total == est.total - est.ema
    names = {"selective_recompute": "--selective-recompute", "ema_on_host": "--ema-on-host"}
    with pytest.raises(D.TrainingMemoryError) as e:
        d.check_memory(free_bytes=int(est.total * 0.9), options=names)
    assert "--selective-recompute (the same loss and weights" in str(e.value)
    assert "gradient_checkpointing" in str(e.value)
    assert "--ema-on-host" not in str(e.value)  # a CPU run's host is its device
    with pytest.raises(D.TrainingMemoryError) as e:
        d.check_memory(free_bytes=int(est.total * 0.9))  # a caller without the options (the node)
    assert "selective" not in str(e.value)
