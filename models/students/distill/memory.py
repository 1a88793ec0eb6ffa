"""What a run needs on the device, estimated before the first step: weights, gradients, AdamW state, EMA,
autocast copies, and the activations one student forward saves for backward, measured by a pass of the real
UNet on the ``meta`` device (no memory, no compute), for each way of keeping them: all of them, selective
recompute (only what convolutions, matrix products and attention produced, plus each layer's input) or gradient
checkpointing (each layer's input).

The peak: what lives for the whole run (weights, AdamW state, the EMA where it is on the device, autocast weight
copies), plus the larger of the activations and the gradients (backward frees the first as it makes the second:
they peak at opposite ends of it; with gradient accumulation both, since the gradients of the micro-batches
before stay), plus working memory. Measured against ``torch.cuda.max_memory_allocated`` and, on the CPU, the
peak of live tensor bytes (``bench/bench_distill.py``), the estimate is meant to stay within +-15 %."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .unet import SAVED_OPS, checkpointable, merge_heads, split_heads, transformer_layers

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    """Bytes the training needs on the device, by part (activations at the given batch and latent size)."""

    student_weights: int
    teacher_weights: int
    grads: int
    optimizer: int
    ema: int
    autocast_copies: int
    activations: int
    workspace: int
    batch_size: int
    latent_hw: tuple[int, int]
    checkpointing: bool
    trainable_params: int
    per_sample_activations: dict = field(default_factory=dict)  # {mode: bytes per sample}, see activation_profile
    selective: bool = False        # selective recompute (with checkpointing off)
    accumulating: bool = False     # gradient accumulation: the gradients live through the next micro-batches
    host: int = 0                  # bytes in host memory instead (the EMA kept on the host, its copy buffers)

    @property
    def mode(self):
        return True if self.checkpointing else ("selective" if self.selective else False)

    @property
    def total(self) -> int:
        static = self.student_weights + self.teacher_weights + self.optimizer + self.ema + self.autocast_copies
        acts = self.activations + self.workspace
        return static + (self.grads + acts if self.accumulating else max(self.grads, self.activations)
                         + self.workspace)

    def describe(self) -> str:
        def g(b):
            return f"{b / GIB:.2f}"
        parts = [f"student weights {g(self.student_weights)}", f"gradients {g(self.grads)}",
                 f"AdamW state {g(self.optimizer)}"]
        if self.ema:
            parts.append(f"EMA {g(self.ema)}")
        if self.teacher_weights:
            parts.append(f"teacher weights {g(self.teacher_weights)}")
        if self.autocast_copies:
            parts.append(f"autocast weight copies {g(self.autocast_copies)}")
        how = "gradient checkpointing on" if self.checkpointing else \
            "selective recompute" if self.selective else "gradient checkpointing off"
        parts.append(f"activations {g(self.activations + self.workspace)} (batch {self.batch_size}, "
                     f"{self.latent_hw[0]}x{self.latent_hw[1]} latents, {how})")
        host = f"; {g(self.host)} GiB more in host memory (the EMA and its copy buffers)" if self.host else ""
        return f"~{g(self.total)} GiB: " + ", ".join(parts) + host

    def with_(self, *, batch_size: int | None = None, checkpointing: bool | None = None,
              selective: bool | None = None, ema_on_host: bool = False) -> MemoryEstimate:
        b = self.batch_size if batch_size is None else batch_size
        c = self.checkpointing if checkpointing is None else checkpointing
        sel = self.selective if selective is None else selective
        mode = True if c else ("selective" if sel else False)
        per = self.per_sample_activations[mode]
        work = self.per_sample_activations[("work", mode)]
        out = replace(self, batch_size=b, checkpointing=c, selective=sel and not c, activations=per * b,
                      workspace=work * b)
        if ema_on_host and self.ema:
            out = replace(out, ema=0, host=self.host + 2 * self.ema)
        return out


class _AttnAccount(torch.autograd.Function):
    """Stands for fused attention in the meta pass: saves q, k, v, out and the log-sum-exp, as SDPA does."""

    marks: set | None = None  # during a pass: the storages attention produced (kept by selective recompute)

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        if _AttnAccount.marks is not None:
            _AttnAccount.marks.update((out.untyped_storage()._cdata, lse.untyped_storage()._cdata))
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta pass)
        return g, g, g


def _meta_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                    skip_output_reshape=False, **kwargs):
    q, k, v = split_heads(q, k, v, heads, skip_reshape)
    return merge_heads(_AttnAccount.apply(q, k, v), skip_output_reshape)


def _meta_copy(module: torch.nn.Module, dtype: torch.dtype, trainable: Callable[[str], bool] | None):
    memo = {}
    for name, p in module.named_parameters():
        req = trainable(name) if trainable else True
        memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=req)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype if not b.is_floating_point() else dtype, device="meta")
    return copy.deepcopy(module, memo)


class _Producers:
    """A dispatch mode that notes which op made each storage (meta tensors: nothing is computed)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        producers = self.producers = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor)}
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        key = t.untyped_storage()._cdata
                        if key not in inputs:  # a new storage (views and in-place ops keep their maker)
                            producers[key] = func
                return out

        self.mode = Mode()


def activation_profile(unet, x_shape, ctx_shape, y_dim, dtype, trainable) -> dict:
    """Bytes saved for backward by one student forward at batch 1, from a pass on the ``meta`` device.

    Returns ``{False: no checkpointing, True: checkpointing, "selective": selective recompute, ("work", mode):
    transient working memory}``.
    """
    meta = _meta_copy(unet, dtype, trainable)
    param_storages = {p.untyped_storage()._cdata for p in meta.parameters()}
    layers = [m for m in transformer_layers(meta) if checkpointable(m)]
    state = {"layer": None}
    seen_all, per_layer, layer_inputs = set(), {}, set()
    totals = {"all": 0, "outside": 0, "inputs": 0, "largest": 0, "kept": 0}
    tracker, marks, kept = _Producers(), set(), set()

    def nbytes(t):
        return t.untyped_storage().nbytes()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key in param_storages:
            return t
        size = nbytes(t)
        totals["largest"] = max(totals["largest"], size)
        if key not in seen_all:
            seen_all.add(key)
            totals["all"] += size
            if state["layer"] is None:
                totals["outside"] += size
        if state["layer"] is not None:
            bucket = per_layer.setdefault(state["layer"], set())
            if key not in bucket:
                bucket.add(key)
                per_layer[(state["layer"], "bytes")] = per_layer.get((state["layer"], "bytes"), 0) + size
            if key not in kept and (tracker.producers.get(key) in SAVED_OPS or key in marks):
                kept.add(key)  # selective recompute keeps it
                totals["kept"] += size
        return t

    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, _i=i):
            state["layer"] = _i
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.untyped_storage()._cdata not in layer_inputs:
                layer_inputs.add(x.untyped_storage()._cdata)
                totals["inputs"] += nbytes(x)

        def post(mod, args, out):
            state["layer"] = None
        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    x = torch.empty(x_shape, device="meta", dtype=dtype)
    ctx = torch.empty(ctx_shape, device="meta", dtype=dtype)
    y = torch.empty((x_shape[0], y_dim), device="meta", dtype=dtype) if y_dim else None
    t = torch.zeros((x_shape[0],), device="meta")
    _AttnAccount.marks = marks
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker.mode:
            out = meta(x, t, context=ctx, y=y, transformer_options={"optimized_attention_override": _meta_attention})
    finally:
        _AttnAccount.marks = None
        for h in handles:
            h.remove()
    out_bytes = out.untyped_storage().nbytes()
    max_layer = max((v for k, v in per_layer.items() if isinstance(k, tuple)), default=0)
    full = totals["all"] + out_bytes
    ckpt = totals["inputs"] + totals["outside"] + max_layer + out_bytes
    # selective: each layer's input and what its convolutions, matrix products and attention made, and in
    # backward one layer's recomputed activations
    selective = min(full, totals["inputs"] + totals["outside"] + totals["kept"] + max_layer + out_bytes)
    # Working memory on top of what is saved: the gradient of the activation being back-propagated and of its
    # input (the teacher's no-grad forward runs before the student's, when neither activations nor gradients
    # live). Two of the largest saved tensors: against the live tensor bytes of bench/bench_distill.py on the CPU
    # (bk-small structure at widths / 10, 32x32 latents, batch 2 and 8, checkpointing off / selective / on) the
    # estimate is 0.94-1.01 of the peak; four (as before) put it at 0.98-1.15.
    work = 2 * totals["largest"]
    return {False: full, True: ckpt, "selective": selective, ("work", False): work, ("work", True): work,
            ("work", "selective"): work}


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
