"""One optimisation step: per micro-batch the teacher (no grad) and the student forward, the loss, backward;
then the gradients checked, clipped and applied (AdamW, EMA). Everything runs on the run's device; the host
reads back one small vector per step (the loss terms and the gradient norm).

The EMA (diffusers' EMAModel warm-up: decay ``d_n = min(ema_decay, n / (n + 9))`` at the n-th applied step, 0 at
the first) lives on the device, or with ``ema_on_host`` in host memory: on a GPU the trained weights are copied
into pinned buffers on a side stream after the optimizer step and a host thread updates the EMA from them while
the next steps run (the next optimizer step waits for the copy, the next update for the thread), so the EMA's
4 bytes per trained parameter leave the device. ``ema_every = N`` updates it every N applied steps as
``e <- D e + (1 - D) p`` with ``D`` the product of those steps' decays: the same weight on the past as N single
updates, with the N-th weights standing for the N - 1 before them (a difference of order N x the weights' change
per step, where the EMA's horizon is 1 / (1 - decay) steps); N = 1 is the per-step EMA exactly. The updates fall
on every N-th applied step counted from the run's start, a resumed run included, and the run's result gets a
last update for the steps after the last N-th one, so a resumed run ends with the uninterrupted run's EMA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed
from .errors import NonFiniteError


def micro_loss(run, forward, nb, ctx, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, its terms) of one micro-batch, on the device: BK-SDM's task + output KD + feature KD, A-SDM's
    mid-block and VGG terms where the plan and weights ask for them."""
    w = run.cfg.weights
    run._t_taps.recording = True
    try:
        t_out = run._run_teacher(nb, ctx, y)
    finally:
        run._t_taps.recording = False
    run._s_taps.recording = True
    try:
        s_out = run._run_student(forward, nb, ctx, y)
    finally:
        run._s_taps.recording = False
    parts: dict[str, torch.Tensor] = {"task": F.mse_loss(s_out, nb.target.float()), "out": F.mse_loss(s_out, t_out)}
    loss = w.task * parts["task"] + w.out * parts["out"]
    feat = None
    for p in run.plan.points:
        m = F.mse_loss(run._s_taps.out[p.name].float(), run._t_taps.out[p.name].detach().float())
        if p.kind == "mid":
            parts["mid"] = m
            loss = loss + w.mid_weight * m
        else:
            feat = m if feat is None else feat + m
    if feat is not None:
        parts["feat"] = feat
        loss = loss + w.feat * feat
    if run.semantic is not None and w.vgg_weight > 0:
        with run._autocast():
            t_feats = run.semantic.teacher_features(run.schedule.predict_x0(nb, t_out))
            parts["vgg"] = run.semantic(run.schedule.predict_x0(nb, s_out), t_feats, nb.alpha_bar)
        loss = loss + w.vgg_weight * parts["vgg"]
    run._t_taps.out.clear()
    run._s_taps.out.clear()
    return loss, parts


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train_step(run, model, forward, step: int) -> tuple[dict[str, float], bool]:
    """Run step ``step`` (all its micro-batches). Returns (the loss terms averaged over micro-batches and
    processes, whether the step was applied). A step whose loss or gradient is not finite changes no weight:
    its gradients are dropped (with fp16 the GradScaler also lowers its scale, as diffusers does)."""
    cfg = run.cfg
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        nb, ctx, y = run.micro_batch(step, micro)
        with distributed.no_sync(forward, micro < cfg.grad_accum - 1):
            loss, parts = micro_loss(run, forward, nb, ctx, y)
            scaled = loss / cfg.grad_accum
            (run._scaler.scale(scaled) if run._scaler is not None else scaled).backward()
        parts["loss"] = loss
        for k, v in parts.items():
            v = v.detach().float() / cfg.grad_accum
            sums[k] = v if k not in sums else sums[k] + v
    params = run._params
    if run._scaler is not None:
        run._scaler.unscale_(run._opt)
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        norm = _grad_norm(params)
    names = list(sums)
    values = distributed.mean(torch.stack([sums[k] for k in names]))
    if run._params_copying is not None:  # the EMA's copy of the last weights is still reading them
        torch.cuda.current_stream(run.device).wait_event(run._params_copying)
        run._params_copying = None
    host = torch.cat([values, norm.detach().float().reshape(1).to(values.device)]).tolist()  # the one sync
    out = dict(zip(names, host[:-1]))
    finite = all(math.isfinite(v) for v in host)
    if finite:
        if run._scaler is not None:
            run._scaler.step(run._opt)
            run._scaler.update()
        else:
            run._opt.step()
        _ema_update(run, params)
    elif run._scaler is not None:
        run._scaler.update()  # records the overflow: lowers the scale, as a skipped GradScaler step does
    run._opt.zero_grad(set_to_none=True)
    return out, finite


def ema_decay_at(run, n: int) -> float:
    """The EMA's decay at the n-th applied step (diffusers' EMAModel warm-up)."""
    return 0.0 if n <= 1 else min(run.cfg.ema_decay, n / (n + 9))


def _ema_update(run, params) -> None:
    if run._ema is None:
        return
    run._ema_updates += 1
    if run._ema_updates % run.cfg.ema_every == 0:
        ema_catch_up(run, params)


def ema_catch_up(run, params=None) -> None:
    """Fold the applied steps since the EMA's last update into it (one update, with the product of their
    decays); nothing when there are none."""
    n, last = run._ema_updates, run._ema_seen
    if run._ema is None or n <= last:
        return
    decay = 1.0
    for k in range(last + 1, n + 1):
        decay *= ema_decay_at(run, k)
    run._ema_seen = n
    params = params if params is not None else run._params
    ema = list(run._ema.values())
    with torch.no_grad():
        if not run._ema_async:  # on the run's device, or a CPU run's host: in this thread
            src = [p.detach() for p in params]
            if ema[0].device != src[0].device:
                src = [p.to(e.device) for p, e in zip(src, ema)]
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, src, alpha=1.0 - decay)
            return
        ema_join(run)  # the previous host update has read its copy
        staging, copied = run._ema_staging, None
        if run.device.type == "cuda":
            stream = run._ema_stream
            stream.wait_stream(torch.cuda.current_stream(run.device))  # the optimizer step wrote the weights
            with torch.cuda.stream(stream):
                for s, p in zip(staging, params):
                    s.copy_(p.detach(), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            run._params_copying = copied
        else:  # a CPU run with the thread forced on (tests): the copy is plain
            for s, p in zip(staging, params):
                s.copy_(p.detach())
        run._ema_job = run._ema_pool.submit(_host_update, ema, staging, decay, copied)


def _host_update(ema, staging, decay: float, copied) -> None:
    if copied is not None:
        copied.synchronize()
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, staging, alpha=1.0 - decay)


def ema_join(run) -> None:
    """Wait for the host thread's EMA update in flight (before the EMA is read or its buffers reused)."""
    job = getattr(run, "_ema_job", None)
    if job is not None:
        run._ema_job = None
        job.result()


def check_weights_finite(run, model) -> None:
    """Never hand back non-finite weights: raise :class:`NonFiniteError` naming the first bad tensor."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    tensors = [p.detach() for n, p in model.named_parameters() if p.is_floating_point()]
    if not tensors:
        return
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)]).tolist()  # one read-back
    bad = [i for i, v in enumerate(norms) if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{len(bad)} of {len(tensors)} trained tensors hold NaN or infinite values (first: "
                             f"{names[bad[0]]}); nothing was returned",
                             "lower learning_rate, use bf16 or fp32 precision, and check the data for NaN/inf",
                             step=len(run._losses), node=run.node, input_name="learning_rate")
