"""Where a distillation step runs: every parameter and activation of a step on the device chosen, only data
crossing from the host (issue: on a GPU machine the step must not run on the CPU).

A CPU machine proves it with the ``meta`` device as the chosen one: a CPU tensor anywhere in the step is then
visible. A dispatch mode watches every operation of a whole run (set-up, steps, EMA, the final copy out):
an operation that mixes a host tensor (more than a scalar) with device tensors is a fault, except the copies
that bring data onto the device and take the result off it; forward hooks check that every module of both
UNets returns device tensors; values read back on the host (the loss, the finite check) read as zeros.
The ComfyUI UNets are the real ones (tiny widths), the teacher moved to the device the old way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .test_distill import STUDENT, TEACHER, drop_blocks, make_data, topo

aten = torch.ops.aten
DEVICE = torch.device("meta")
#: the only operations through which tensors may cross between the host and the device
CROSSING = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default}


class DeviceAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []
        self.device_ops = 0
        self.host_to_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_dev = [t for t in tensors if t.device.type == DEVICE.type]
        if func is aten._local_scalar_dense.default and on_dev:  # a value read back: the step's one sync
            t = on_dev[0]
            return True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        if func is aten._to_copy.default and on_dev and torch.device(kwargs.get("device", DEVICE)).type == "cpu":
            return torch.zeros(on_dev[0].shape, dtype=kwargs.get("dtype") or on_dev[0].dtype)  # result copied off
        if func is aten._to_copy.default and not on_dev and kwargs.get("device") == DEVICE:
            self.host_to_device += 1
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if on_dev:
            self.device_ops += 1
            if host and func not in CROSSING:
                self.mixed.append(f"{func}: host {[tuple(t.shape) for t in host]}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    from distilled_unets.models.structure.topology import from_comfy_config
    from distilled_unets.models.students import distill as D

    from . import _tiny_models as tm

    return tm, D, from_comfy_config


def _run(env, monkeypatch, **cfg):
    tm, D, _ = env
    teacher = tm.build("sd15", TEACHER, model_channels=32, seed=1)
    student = tm.build("sd15", STUDENT, model_channels=32, seed=2)
    drop_blocks(D, teacher.model.diffusion_model, topo(env, teacher), student.model.diffusion_model,
                topo(env, student))
    data, held = make_data(D, n_train=6, n_held=2)
    t_unet = copy.deepcopy(teacher.model.diffusion_model).to(DEVICE)  # the teacher loaded onto the device
    trained = []
    orig = D.Distiller._trainable_copy

    def capture(self):
        m = orig(self)
        trained.append(m)
        return m

    monkeypatch.setattr(D.Distiller, "_trainable_copy", capture)
    d = D.Distiller(teacher=t_unet, student=student.model.diffusion_model, teacher_topology=topo(env, teacher),
                    student_topology=topo(env, student),
                    schedule=D.NoiseSchedule(teacher.model.model_sampling, prediction="eps"), data=data, heldout=held,
                    config=D.DistillConfig(steps=2, batch_size=2, features="stages+mid", **cfg), device=DEVICE)
    off_device: list[str] = []

    def watch(name):
        def hook(module, args, out):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device != DEVICE:
                    off_device.append(f"{name} -> {t.device}")
        return hook

    handles = [m.register_forward_hook(watch(f"teacher.{n}")) for n, m in t_unet.named_modules()]
    orig_setup = D.Distiller._setup

    def setup_and_watch(self, model):
        handles.extend(m.register_forward_hook(watch(f"student.{n}")) for n, m in model.named_modules())
        wrong = [n for n, p in model.named_parameters() if p.device != DEVICE]
        off_device.extend(f"parameter {n} on the host" for n in wrong)
        return orig_setup(self, model)

    monkeypatch.setattr(D.Distiller, "_setup", setup_and_watch)
    audit = DeviceAudit()
    try:
        with audit:
            res = d.run()
    finally:
        for h in handles:
            h.remove()
    return audit, off_device, res, trained


@pytest.mark.parametrize("cfg", [{}, {"gradient_checkpointing": True, "ema_decay": 0.999, "grad_accum": 2},
                                 {"selective_recompute": True, "ema_decay": 0.99, "ema_on_host": True}],
                         ids=["plain", "checkpointing+ema+accumulation", "selective+ema-on-host"])
def test_every_parameter_and_activation_of_a_step_is_on_the_chosen_device(env, monkeypatch, cfg):
    audit, off_device, res, trained = _run(env, monkeypatch, **cfg)
    assert res.steps_done == 2 and len(res.losses) == 2
    assert audit.device_ops > 1000, "the run did not compute on the chosen device"
    assert audit.host_to_device > 0, "no data crossed onto the device"
    assert not audit.mixed, "operations mixing host and device tensors:\n" + "\n".join(audit.mixed[:20])
    assert not off_device, "modules or parameters off the device:\n" + "\n".join(off_device[:20])
    assert all(p.device == DEVICE for m in trained for p in m.parameters())


def test_the_audit_sees_a_step_that_computes_on_the_host(env, monkeypatch):
    """The check would fail for the placement the engine had before: the noise tables read where the model's
    sampling object lives (the CPU under dynamic VRAM)."""
    _, D, _ = env

    def host_tables(self, device):
        return self.sigmas, self._timesteps  # left on the host

    monkeypatch.setattr(D.NoiseSchedule, "tables", host_tables)
    try:
        audit, off_device, _, _ = _run(env, monkeypatch)
    except (RuntimeError, NotImplementedError) as e:  # torch itself refused the mixed-device operation
        assert "device" in str(e).lower() or "meta" in str(e).lower(), e
    else:
        assert audit.mixed or off_device, "the audit missed host computation inside the step"
