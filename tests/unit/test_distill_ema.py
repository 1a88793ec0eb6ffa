"""The EMA updated every N steps (models/students/distill/step.py): ``e <- D e + (1 - D) p`` with ``D`` the product
of the N steps' decays (diffusers' EMAModel warm-up), a last update for the steps after the last N-th at the end;
N = 1 is the per-step EMA's own arithmetic. A host-free check on plain tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import step as S


def fake_run(every: int, decay: float = 0.9):
    p = [torch.zeros(5), torch.zeros(3, 2)]
    run = SimpleNamespace(cfg=D.DistillConfig(steps=1, ema_decay=decay, ema_every=every), _params=p,
                          _ema={"a": p[0].clone(), "b": p[1].clone()}, _ema_updates=0, _ema_seen=0,
                          _ema_async=False, device=torch.device("cpu"))
    return run, p


def trajectory(n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, generator=g), torch.randn(3, 2, generator=g)) for _ in range(n)]


def per_step(run, n):
    return 0.0 if n <= 1 else min(run.cfg.ema_decay, n / (n + 9))


@pytest.mark.parametrize("every", [1, 3])
def test_every_n_steps_is_the_product_of_their_decays(every):
    run, params = fake_run(every)
    steps = trajectory(8)
    expect = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)]
    seen = 0
    for n, values in enumerate(steps, start=1):
        for p, v in zip(params, values):
            p.copy_(v)
        S._ema_update(run, params)
        if n % every == 0 or n == len(steps):
            if n % every:
                S.ema_catch_up(run)  # the run's end
            decay = math.prod(per_step(run, k) for k in range(seen + 1, n + 1))
            expect = [decay * e + (1 - decay) * v.double() for e, v in zip(expect, values)]
            seen = n
            for got, want in zip(run._ema.values(), expect):
                torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert run._ema_updates == run._ema_seen == 8


def test_every_step_is_the_per_step_ema_bit_for_bit():
    run, params = fake_run(1)
    ref = [p.clone() for p in params]
    for n, values in enumerate(trajectory(6), start=1):
        for p, v in zip(params, values):
            p.copy_(v)
        S._ema_update(run, params)
        d = 0.0 if n <= 1 else min(0.9, n / (n + 9))  # the engine's formula before ema_every existed
        torch._foreach_mul_(ref, d)
        torch._foreach_add_(ref, list(values), alpha=1.0 - d)
        assert all(torch.equal(a, b) for a, b in zip(run._ema.values(), ref))


def test_ema_every_is_validated_and_named_by_its_input():
    with pytest.raises(D.DistillError) as e:
        D.DistillConfig(steps=1, ema_every=0).validate()
    assert e.value.input_name == "ema_every"
