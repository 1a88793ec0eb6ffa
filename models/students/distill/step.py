"""One optimisation step: per micro-batch the teacher (no grad) and the student forward, the loss, backward;
then the gradients checked, clipped and applied (AdamW, EMA). Everything runs on the run's device; the host
reads back one small vector per step (the loss terms and the gradient norm)."""

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


def _ema_update(run, params) -> None:
    if run._ema is None:
        return
    run._ema_updates += 1
    n = run._ema_updates
    decay = 0.0 if n <= 1 else min(run.cfg.ema_decay, n / (n + 9))
    with torch.no_grad():
        ema = list(run._ema.values())
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1.0 - decay)


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
