"""Knowledge distillation of a student UNet from its teacher (BK-SDM, A-SDM), host-free.

Duck-typed on ComfyUI's openaimodel ``UNetModel`` (``input_blocks``, ``middle_block``, ``output_blocks``,
each a sequence of layers; ``forward(x, timesteps, context=, y=, transformer_options=)``) and on ComfyUI's
``model_sampling`` object (``sigmas``, ``timestep``, ``noise_scaling``, ``calculate_input``,
``calculate_denoised``); nothing here imports ComfyUI.

What one optimisation step does (BK-SDM's ``kd_train_text_to_image.py``, generalised):

* per micro-batch: samples by an epoch permutation, timesteps uniform over the schedule's training steps,
  Gaussian noise, all drawn from a generator seeded by ``(seed, step, micro-batch)`` so that a run resumed
  from a checkpoint draws exactly what the uninterrupted run drew;
* the noised input is made the way ComfyUI feeds its UNet (``noise_scaling`` then ``calculate_input``,
  timestep ``timestep(sigma)``), i.e. ``sqrt(a)x0 + sqrt(1-a)eps`` at step ``t`` for SD's discrete
  schedule; targets are epsilon or ``v = sqrt(a)eps - sqrt(1-a)x0``, exactly BK-SDM's scheduler targets;
* teacher forward under ``no_grad`` (outside inference mode), student forward, and
  ``loss = l_task MSE(out_s, target) + l_out MSE(out_s, out_t) + l_feat sum_i MSE(f_s,i, f_t,i)``
  (+ ``l_mid`` mid-block output, + ``l_vgg`` VGG term: A-SDM's semantic-aware supervision);
* backward (scaled by 1 / accumulation), then grad-norm clip 1, AdamW, EMA of the trained weights.

Feature points (:func:`feature_plan`): BK-SDM pairs the outputs of ``down_blocks.0-3`` and ``up_blocks.0-3``
(base/small); for its tiny student, whose deepest kept level lost its downsampler, the last attention's
``proj_out`` of that level. Here the pairing is derived from the two topologies: every level both models
have gives its down-stage output and its up-stage output, the tiny rule applies wherever the teacher
downsamples a level that the student does not, and ``+mid`` adds the mid-block output when both have a mid
block of the same shape. Anything that cannot pair is left out with a report line.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .errors import PackError
from .topology import Topology
from .weights import save_new

log = logging.getLogger("distilled_unets")

__all__ = ["LossWeights", "PRESETS", "FeaturePoint", "FeaturePlan", "feature_plan", "NoiseSchedule", "KDData",
           "DistillConfig", "Distiller", "TrainResult", "MemoryEstimate", "DistillError", "TrainingMemoryError",
           "CheckpointError", "sdpa_attention", "draw_batch", "enable_gradient_checkpointing", "read_checkpoint_meta",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "distilled_unets.distill_checkpoint"
CHECKPOINT_VERSION = "1"
GIB = 1024 ** 3


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

class DistillError(PackError):
    """Distillation settings or inputs that cannot work (nothing to train, mismatched models, bad data)."""


class TrainingMemoryError(DistillError):
    """The estimated training memory exceeds what the device has free (raised before the first step)."""

    def __init__(self, problem: str, fix: str, *, estimate: MemoryEstimate | None = None, free_bytes: int = 0,
                 **kw):
        super().__init__(problem, fix, **kw)
        self.estimate = estimate
        self.free_bytes = free_bytes


class CheckpointError(DistillError):
    """A training checkpoint that cannot be resumed from."""


# ------------------------------------------------------------------------------------------------
# loss weights
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms. ``mid`` and ``vgg`` default (None) to ``feat`` and ``out``.

    ``mid`` (A-SDM's mid-block supervision) is one more feature-KD term of the same kind, so it gets the
    feature weight; ``vgg`` supervises the same output as the output-KD term (in a semantic space), so it
    gets the output weight. A-SDM publishes neither.
    """

    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    mid: float | None = None
    vgg: float | None = None

    @property
    def mid_weight(self) -> float:
        return self.feat if self.mid is None else self.mid

    @property
    def vgg_weight(self) -> float:
        return self.out if self.vgg is None else self.vgg

    def describe(self) -> str:
        return (f"task {self.task:g}, output KD {self.out:g}, feature KD {self.feat:g}, "
                f"mid {self.mid_weight:g}, VGG {self.vgg_weight:g}")


#: BK-SDM (kd_train_text_to_image.py: lambda_sd = lambda_kd_output = lambda_kd_feat = 1) and segmind
#: distill-sd (task 1, output 0.5, features 0.5).
PRESETS = {"bk-sdm": LossWeights(1.0, 1.0, 1.0), "segmind": LossWeights(1.0, 0.5, 0.5)}


# ------------------------------------------------------------------------------------------------
# feature points from two topologies
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    res: tuple[tuple[int, ...], ...]    # per level: input_blocks index of each res block
    res_depth: tuple[tuple[int, ...], ...]
    down: tuple[int | None, ...]        # per level: input_blocks index of the downsampler
    out: tuple[tuple[int, ...], ...]    # per level: output_blocks indices
    out_depth: tuple[tuple[int, ...], ...]
    mid_layers: int                     # 0: no middle block


def _layout(t: Topology) -> _Layout:
    res, res_depth, down = [], [], []
    k = 1
    depths = t.input_depths_by_level()
    for level in range(t.levels):
        n = t.num_res_blocks[level]
        res.append(tuple(range(k, k + n)))
        res_depth.append(tuple(depths[level]))
        k += n
        if level < t.levels - 1:
            down.append(k)
            k += 1
        else:
            down.append(None)
    out, out_depth = [None] * t.levels, [None] * t.levels
    k = 0
    depths_out = t.output_depths()  # output_blocks order: deepest level first
    for level in reversed(range(t.levels)):
        n = t.num_res_blocks[level] + 1
        out[level] = tuple(range(k, k + n))
        out_depth[level] = tuple(depths_out[k:k + n])
        k += n
    mid = {-2: 0, -1: 1}.get(t.transformer_depth_middle, 3)
    return _Layout(tuple(res), tuple(res_depth), tuple(down), tuple(out), tuple(out_depth), mid)


def _down_out(lay: _Layout, level: int) -> str:
    """Module whose output is the down stage's output (BK-SDM ``down_blocks.i`` output[0])."""
    if lay.down[level] is not None:
        return f"input_blocks.{lay.down[level]}.0"
    last = lay.res[level][-1]
    return f"input_blocks.{last}.{1 if lay.res_depth[level][-1] > 0 else 0}"


def _up_out(lay: _Layout, level: int) -> str:
    last = lay.out[level][-1]
    layer = (1 if lay.out_depth[level][-1] > 0 else 0) + (1 if level > 0 else 0)
    return f"output_blocks.{last}.{layer}"


@dataclass(frozen=True)
class FeaturePoint:
    """One feature-KD pair: hook the output of ``teacher`` / ``student`` (module paths in the UNet)."""

    name: str
    teacher: str
    student: str
    label: str  # in BK-SDM's diffusers vocabulary
    kind: str = "stage"  # "stage" | "mid"


@dataclass(frozen=True)
class FeaturePlan:
    points: tuple[FeaturePoint, ...]
    skipped: tuple[str, ...]

    def report_lines(self) -> list[str]:
        lines = [f"feature KD ({len(self.points)} points): " + "; ".join(p.label for p in self.points)]
        lines += [f"not paired: {s}" for s in self.skipped]
        return lines


def feature_plan(teacher: Topology, student: Topology, *, stages: bool = True, mid: bool = False) -> FeaturePlan:
    """BK-SDM's feature pairing generalised to any teacher/student topology pair (see module docstring)."""
    T, S = _layout(teacher), _layout(student)
    pts: list[FeaturePoint] = []
    skipped: list[str] = []
    common = min(teacher.levels, student.levels)
    if stages:
        ups = []
        for level in range(common):
            tc, sc = teacher.level_channels(level), student.level_channels(level)
            t_up, s_up = teacher.levels - 1 - level, student.levels - 1 - level
            if tc != sc:
                skipped.append(f"level {level}: teacher has {tc} channels, student {sc}")
                continue
            t_down, s_down = T.down[level] is not None, S.down[level] is not None
            if t_down == s_down:
                pts.append(FeaturePoint(f"down.{level}", _down_out(T, level), _down_out(S, level),
                                        f"down_blocks.{level}"))
            elif t_down and not s_down:
                # BK-SDM-Tiny: the student's deepest level lost its downsampler; pair before downsampling
                ti, si = len(T.res[level]) - 1, len(S.res[level]) - 1
                if T.res_depth[level][-1] > 0 and S.res_depth[level][-1] > 0:
                    pts.append(FeaturePoint(
                        f"down.{level}.proj_out", f"input_blocks.{T.res[level][-1]}.1.proj_out",
                        f"input_blocks.{S.res[level][-1]}.1.proj_out",
                        f"down_blocks.{level}.attentions.{ti}.proj_out ↔ down_blocks.{level}.attentions.{si}"
                        ".proj_out"))
                else:
                    pts.append(FeaturePoint(
                        f"down.{level}.resnet", f"input_blocks.{T.res[level][-1]}.0",
                        f"input_blocks.{S.res[level][-1]}.0",
                        f"down_blocks.{level}.resnets.{ti} ↔ down_blocks.{level}.resnets.{si}"))
            else:
                skipped.append(f"down_blocks.{level}: the student downsamples where the teacher does not")
            label = f"up_blocks.{t_up}" if t_up == s_up else f"up_blocks.{t_up} ↔ up_blocks.{s_up}"
            ups.append(FeaturePoint(f"up.{level}", _up_out(T, level), _up_out(S, level), label))
        pts.extend(sorted(ups, key=lambda p: -int(p.name.split(".")[1])))  # up_blocks order
        for level in range(common, teacher.levels):
            skipped.append(f"teacher down_blocks.{level} / up_blocks.{teacher.levels - 1 - level}: the student "
                           "has no such level")
    if mid:
        if T.mid_layers == 0 or S.mid_layers == 0:
            who = "teacher" if T.mid_layers == 0 else "student"
            skipped.append(f"mid: the {who} has no mid block (mid-block supervision left out)")
        elif teacher.levels != student.levels or (teacher.level_channels(teacher.levels - 1)
                                                  != student.level_channels(student.levels - 1)):
            skipped.append("mid: the two mid blocks work at different shapes (left out)")
        else:
            pts.append(FeaturePoint("mid", f"middle_block.{T.mid_layers - 1}", f"middle_block.{S.mid_layers - 1}",
                                    "mid_block", kind="mid"))
    return FeaturePlan(tuple(pts), tuple(skipped))


# ------------------------------------------------------------------------------------------------
# noising with the model's own sampling semantics
# ------------------------------------------------------------------------------------------------

class _DiscreteSampling:
    """Stand-in for ComfyUI's ``ModelSamplingDiscrete`` + EPS/V_PREDICTION when only sigmas are known."""

    def __init__(self, sigmas: torch.Tensor, prediction: str):
        self.sigmas = sigmas.float()
        self.prediction = prediction

    def timestep(self, sigma):
        dists = sigma.log().to(self.sigmas.device) - self.sigmas.log()[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma.view(-1, *([1] * (noise.ndim - 1)))

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(-1, *([1] * (noise.ndim - 1))) ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        s = sigma.view(-1, *([1] * (model_output.ndim - 1)))
        if self.prediction == "eps":
            return model_input - model_output * s
        return model_input / (s ** 2 + 1.0) - model_output * s / (s ** 2 + 1.0) ** 0.5


@dataclass
class NoisedBatch:
    x_in: torch.Tensor        # what the UNet sees (ComfyUI's calculate_input of the noised latent)
    x_noisy: torch.Tensor     # x0 + sigma * eps (ComfyUI's sampler space, for calculate_denoised)
    timesteps: torch.Tensor   # the UNet's timestep input
    target: torch.Tensor      # epsilon or v
    sigma: torch.Tensor
    alpha_bar: torch.Tensor   # 1 / (1 + sigma^2)


class NoiseSchedule:
    """Training noise for an epsilon or v-prediction model, through its ``model_sampling`` object."""

    PREDICTIONS = ("eps", "v_prediction")

    def __init__(self, sampling: Any = None, *, prediction: str = "eps", sigmas: torch.Tensor | None = None):
        if prediction not in self.PREDICTIONS:
            raise DistillError(f"prediction type '{prediction}' cannot be distilled with the BK-SDM targets",
                               "use an epsilon or v-prediction teacher and student")
        if sampling is None:
            if sigmas is None:
                raise ValueError("give the model's sampling object or its sigmas")
            sampling = _DiscreteSampling(sigmas, prediction)
        self.sampling = sampling
        self.prediction = prediction
        self.sigmas = sampling.sigmas.detach().float().cpu().clone()
        self.num_timesteps = len(self.sigmas)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> NoisedBatch:
        ms = self.sampling
        sig_dev = ms.sigmas.device
        sigma = ms.sigmas[t.to(sig_dev)].to(x0.device, torch.float32)
        x_noisy = ms.noise_scaling(sigma, noise, x0, False)
        x_in = ms.calculate_input(sigma, x_noisy)
        timesteps = ms.timestep(sigma).float()
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        if self.prediction == "eps":
            target = noise
        else:  # v = sqrt(a) eps - sqrt(1-a) x0 with a = 1/(1+sigma^2)
            target = (noise - s * x0) / torch.sqrt(1.0 + s * s)
        return NoisedBatch(x_in, x_noisy, timesteps, target, sigma, 1.0 / (1.0 + sigma * sigma))

    def predict_x0(self, nb: NoisedBatch, model_output: torch.Tensor) -> torch.Tensor:
        return self.sampling.calculate_denoised(nb.sigma, model_output.float(), nb.x_noisy)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def _lcm(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


@dataclass
class KDData:
    """Training samples: latents in the model's space (after ``process_latent_in``) with their conditioning.

    ``context``: one ``[L, D]`` tensor per sample (lengths may differ: they are repeated to a common length
    in a batch, which leaves cross-attention unchanged, as ComfyUI does), a ``[N, L, D]`` tensor, or one
    ``[L, D]`` / ``[1, L, D]`` tensor for all. ``y``: ``[N, adm]`` (SDXL) or one ``[adm]`` / ``[1, adm]``
    for all, or None.
    """

    latents: torch.Tensor
    context: Any
    y: torch.Tensor | None = None

    def __post_init__(self):
        n = self.latents.shape[0]
        ctx = self.context
        if isinstance(ctx, torch.Tensor):
            if ctx.ndim == 2:
                ctx = [ctx]
            elif ctx.ndim == 3:
                ctx = list(ctx.unbind(0))
            else:
                raise DistillError(f"conditioning has shape {tuple(ctx.shape)}", "give [tokens, width] per sample")
        ctx = [c[0] if c.ndim == 3 and c.shape[0] == 1 else c for c in ctx]
        if len(ctx) not in (1, n):
            raise DistillError(f"{len(ctx)} conditionings for {n} latents",
                               "give one conditioning per latent, or one for all")
        self._ctx = ctx
        y = self.y
        if y is not None:
            y = y.reshape(-1, y.shape[-1])
            if y.shape[0] not in (1, n):
                raise DistillError(f"{y.shape[0]} pooled/size vectors for {n} latents",
                                   "give one per latent, or one for all")
        self._y = y

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def context_dim(self) -> int:
        return self._ctx[0].shape[-1]

    @property
    def max_tokens(self) -> int:
        return max(c.shape[0] for c in self._ctx)

    def batch(self, idx: torch.Tensor):
        """(x0, context, y) for sample indices ``idx``, as new normal (non-inference) CPU tensors."""
        x0 = self.latents[idx].float().clone()
        cs = [self._ctx[int(i) if len(self._ctx) > 1 else 0] for i in idx]
        n = _lcm(c.shape[0] for c in cs)
        ctx = torch.stack([c.repeat(n // c.shape[0], 1) for c in cs]).float().clone()
        y = None
        if self._y is not None:
            y = (self._y[idx] if self._y.shape[0] > 1 else self._y.expand(len(idx), -1)).float().clone()
        return x0, ctx, y

    def split_tail(self, k: int) -> tuple[KDData, KDData]:
        """(the first ``len - k`` samples, the last ``k``): held-out samples taken from the data."""
        n = len(self)
        ctx = self._ctx if len(self._ctx) == n else self._ctx * n
        y = None if self._y is None else (self._y if self._y.shape[0] == n else self._y.expand(n, -1))
        head = KDData(self.latents[:n - k], ctx[:n - k], None if y is None else y[:n - k])
        tail = KDData(self.latents[n - k:], ctx[n - k:], None if y is None else y[n - k:])
        return head, tail

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((tuple(self.latents.shape), len(self._ctx))).encode())
        h.update(repr(round(float(self.latents.double().sum()), 6)).encode())
        h.update(repr(round(float(sum(c.double().sum() for c in self._ctx)), 6)).encode())
        return h.hexdigest()


def _generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *parts)`` (per-step randomness independent of history)."""
    digest = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(seed, "epoch", epoch))


def draw_batch(seed: int, step: int, micro: int, *, n_data: int, batch_size: int, grad_accum: int,
               num_timesteps: int, sample_shape: tuple[int, ...]):
    """The random draws of one micro-batch, from ``(seed, step, micro)`` alone: sample indices (every sample
    once per epoch, in an order seeded by the epoch), timesteps uniform over ``num_timesteps`` (BK-SDM's
    ``torch.randint(0, num_train_timesteps)``) and Gaussian noise."""
    start = (step * grad_accum + micro) * batch_size
    idx = []
    for p in range(start, start + batch_size):
        epoch, pos = divmod(p, n_data)
        idx.append(int(_epoch_order(seed, epoch, n_data)[pos]))
    gen = _generator(seed, "step", step, micro)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *sample_shape), generator=gen, dtype=torch.float32)
    return torch.tensor(idx, dtype=torch.long), t, noise


# ------------------------------------------------------------------------------------------------
# attention and gradient checkpointing on ComfyUI's UNet
# ------------------------------------------------------------------------------------------------

def sdpa_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                   skip_output_reshape=False, **kwargs):
    """An ``optimized_attention_override`` that runs torch's fused SDPA (which has a backward on every device).

    ComfyUI picks its attention backend at import: on CPU the sub-quadratic one (slow and memory-hungry
    when differentiated), on GPUs possibly sage attention (no backward). Masked calls go to ``func``.
    """
    if mask is not None:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    q, k, v = _split_heads(q, k, v, heads, skip_reshape)
    dtype = q.dtype
    if attn_precision == torch.float32 and dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    return _merge_heads(F.scaled_dot_product_attention(q, k, v).to(dtype), skip_output_reshape)


def _split_heads(q, k, v, heads: int, skip_reshape: bool):
    """ComfyUI's attention inputs ([b, tokens, heads*d], or already [b, heads, tokens, d]) as [b, heads, tokens, d]."""
    if skip_reshape:
        return q, k, v
    b, _, hd = q.shape
    return tuple(t.reshape(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))


def _merge_heads(out, skip_output_reshape: bool):
    if skip_output_reshape:
        return out
    b, heads, _, d = out.shape
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def _layers(unet) -> list[torch.nn.Module]:
    blocks = list(unet.input_blocks) + ([unet.middle_block] if unet.middle_block is not None else []) \
        + list(unet.output_blocks)
    return [layer for block in blocks for layer in block]


def _checkpointable(layer: torch.nn.Module) -> bool:
    """Res blocks and transformers (as diffusers checkpoints resnets and transformer blocks); not samplers."""
    return any(True for _ in layer.parameters()) and type(layer).__name__ not in ("Upsample", "Downsample") \
        and not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))


class _CheckpointHandle:
    def __init__(self, layers):
        self.layers = layers

    def remove(self):
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.__dict__["forward"]
        self.layers = []


def enable_gradient_checkpointing(unet) -> _CheckpointHandle:
    """Checkpoint every res block and transformer layer of ``unet`` (non-reentrant; a per-instance
    ``forward`` so ComfyUI's isinstance dispatch in ``forward_timestep_embed`` still works)."""
    patched = []
    for layer in _layers(unet):
        if not _checkpointable(layer) or "forward" in layer.__dict__:
            continue
        orig = layer.forward

        def fwd(*args, _orig=orig, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        layer.forward = fwd
        patched.append(layer)
    return _CheckpointHandle(patched)


class _Taps:
    """Forward hooks that record feature outputs while ``recording`` is set (not during recomputation)."""

    def __init__(self, unet, paths: dict[str, str]):
        self.out: dict[str, torch.Tensor] = {}
        self.recording = False
        self.handles = []
        for name, path in paths.items():
            try:
                module = unet.get_submodule(path)
            except AttributeError as e:
                raise DistillError(f"the UNet has no module '{path}' for feature point {name}",
                                   "the model does not match its structure description; rebuild or reload it"
                                   ) from e
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if self.recording:
                self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.out = {}


# ------------------------------------------------------------------------------------------------
# memory estimate
# ------------------------------------------------------------------------------------------------

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
    per_sample_activations: dict = field(default_factory=dict)  # {checkpointing: bytes per sample}

    @property
    def total(self) -> int:
        return (self.student_weights + self.teacher_weights + self.grads + self.optimizer + self.ema
                + self.autocast_copies + self.activations + self.workspace)

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
        parts.append(f"activations {g(self.activations + self.workspace)} (batch {self.batch_size}, "
                     f"{self.latent_hw[0]}x{self.latent_hw[1]} latents, gradient checkpointing "
                     f"{'on' if self.checkpointing else 'off'})")
        return f"~{g(self.total)} GiB: " + ", ".join(parts)

    def with_(self, *, batch_size: int | None = None, checkpointing: bool | None = None) -> MemoryEstimate:
        b = self.batch_size if batch_size is None else batch_size
        c = self.checkpointing if checkpointing is None else checkpointing
        per = self.per_sample_activations[c]
        work = self.per_sample_activations[("work", c)]
        return replace(self, batch_size=b, checkpointing=c, activations=per * b, workspace=work * b)


class _AttnAccount(torch.autograd.Function):
    """Stands for fused attention in the meta pass: saves q, k, v, out and the log-sum-exp, as SDPA does."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta pass)
        return g, g, g


def _meta_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                    skip_output_reshape=False, **kwargs):
    q, k, v = _split_heads(q, k, v, heads, skip_reshape)
    return _merge_heads(_AttnAccount.apply(q, k, v), skip_output_reshape)


def _meta_copy(module: torch.nn.Module, dtype: torch.dtype, trainable: Callable[[str], bool] | None):
    memo = {}
    for name, p in module.named_parameters():
        req = trainable(name) if trainable else True
        memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=req)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype if not b.is_floating_point() else dtype, device="meta")
    return copy.deepcopy(module, memo)


def _activation_profile(unet, x_shape, ctx_shape, y_dim, dtype, trainable) -> dict:
    """Bytes saved for backward by one student forward at batch 1, from a pass on the ``meta`` device.

    Returns ``{False: no checkpointing, True: checkpointing, ("work", c): transient working memory}``.
    """
    meta = _meta_copy(unet, dtype, trainable)
    param_storages = {p.untyped_storage()._cdata for p in meta.parameters()}
    layers = [m for m in _layers(meta) if _checkpointable(m)]
    state = {"layer": None}
    seen_all, per_layer, layer_inputs = set(), {}, set()
    totals = {"all": 0, "outside": 0, "inputs": 0, "largest": 0}

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
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta(x, t, context=ctx, y=y, transformer_options={"optimized_attention_override": _meta_attention})
    finally:
        for h in handles:
            h.remove()
    out_bytes = out.untyped_storage().nbytes()
    max_layer = max((v for k, v in per_layer.items() if isinstance(k, tuple)), default=0)
    full = totals["all"] + out_bytes
    ckpt = totals["inputs"] + totals["outside"] + max_layer + out_bytes
    # Working memory on top of what is saved: the gradient of the activation being back-propagated and of
    # its input, the teacher's no-grad forward (a few live activations) and the loss terms' temporaries.
    work = 4 * totals["largest"]
    return {False: full, True: ckpt, ("work", False): work, ("work", True): work}


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# ------------------------------------------------------------------------------------------------
# configuration and result
# ------------------------------------------------------------------------------------------------

FEATURE_MODES = ("none", "stages", "stages+mid")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DistillConfig:
    steps: int
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 5e-5
    weights: LossWeights = PRESETS["bk-sdm"]
    features: str = "stages"
    seed: int = 0
    ema_decay: float = 0.9999        # 0 = no EMA; warm-up as diffusers' EMAModel: min(decay, n / (n + 9))
    grad_clip: float = 1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    gradient_checkpointing: bool = False
    precision: str = "auto"          # auto: bf16 (fp16 without bf16) autocast on a GPU, fp32 on CPU
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_prefix: str = "distill"
    heldout_timesteps: int = 4
    heldout_every: int = 0
    attention: str = "sdpa"          # "sdpa": torch SDPA override; "host": the UNet's own backend

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "steps", "at least 1"),
            (self.batch_size >= 1, "batch_size", "batch_size", "at least 1"),
            (self.grad_accum >= 1, "grad_accum", "gradient_accumulation", "at least 1"),
            (self.learning_rate > 0, "learning_rate", "learning_rate", "positive"),
            (0 <= self.ema_decay < 1, "ema_decay", "ema_decay", "in [0, 1) (0 = no EMA)"),
            (self.features in FEATURE_MODES, "features", "feature_points", f"one of {FEATURE_MODES}"),
            (self.precision in PRECISIONS, "precision", "precision", f"one of {PRECISIONS}"),
            (self.checkpoint_every >= 0, "checkpoint_every", "checkpoint_every", "0 (off) or more"),
            (self.heldout_timesteps >= 1, "heldout_timesteps", "heldout_timesteps", "at least 1"),
            (self.attention in ("sdpa", "host"), "attention", "attention", "sdpa or host"),
        ]
        for ok, attr, name, want in checks:
            if not ok:
                raise DistillError(f"{name} is {getattr(self, attr)!r}", f"set {name} {want}", input_name=name)
        w = self.weights
        if min(w.task, w.out, w.feat, w.mid_weight, w.vgg_weight) < 0:
            raise DistillError("a loss weight is negative", "use weights >= 0", input_name="loss_weights")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise DistillError("checkpoint_every is set but no checkpoint folder", "give a checkpoint folder",
                               input_name="checkpoint_every")

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("checkpoint_dir")
        return json.dumps(d, sort_keys=True)


#: settings that must equal the checkpoint's for a resumed run to reproduce the uninterrupted one
_REPRODUCING = ("batch_size", "grad_accum", "learning_rate", "weights", "features", "seed", "ema_decay",
                "grad_clip", "weight_decay", "betas", "adam_eps", "precision")


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    losses: list[float]
    parts: dict[str, list[float]]
    heldout_before: float
    heldout_after: float
    heldout_after_raw: float
    heldout_curve: list[tuple[int, float]]
    steps_done: int
    samples_seen: int
    seconds: float
    checkpoints: list[str]
    cancelled: bool
    resumed_from: int
    report: list[str]


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], directory: str, stem: str) -> str:
    """Write ``<stem>.safetensors`` (``<stem>_1`` ... if taken) atomically; never overwrites a file."""
    try:
        return save_new(tensors, directory, lambda n: f"{stem}{'' if n == 0 else f'_{n}'}.safetensors", metadata,
                        tries=1000)
    except FileExistsError as e:
        raise CheckpointError(f"no free checkpoint name for {stem} in {directory}", "clean up the folder") from e


def read_checkpoint_meta(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint: {e}", "pick a checkpoint this node wrote",
                              path=path) from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("the file is not a distillation checkpoint of this pack",
                              "pick a checkpoint written by DistillStudentUNet", path=path)
    return meta


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------

def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


class Distiller:
    """One distillation run: a trainable copy of the student, trained toward the teacher.

    The inputs (both UNets, data) are never modified: the student is copied (trainable parameters as fp32
    master weights on ``device``), hooks are removed when the run ends, the teacher runs under ``no_grad``.
    ``trainable(name)`` selects the student parameters that train (ldm names inside the UNet); the rest stay
    bit-identical.
    """

    def __init__(self, *, teacher, student, teacher_topology: Topology, student_topology: Topology,
                 schedule: NoiseSchedule, data: KDData, config: DistillConfig, heldout: KDData | None = None,
                 trainable: Callable[[str], bool] | None = None, semantic=None,
                 device: torch.device | str | None = None, teacher_transformer_options: dict | None = None,
                 teacher_dtype: torch.dtype | None = None, node: str = "DistillStudentUNet"):
        config.validate()
        self.teacher, self.student = teacher, student
        self.tt, self.st = teacher_topology, student_topology
        self.schedule, self.data, self.heldout, self.cfg = schedule, data, heldout, config
        self.semantic = semantic
        self.node = node
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.teacher_opts = dict(teacher_transformer_options or {})
        self._t_dtype = teacher_dtype
        self.trainable = trainable or (lambda name: True)
        self.autocast = _autocast_dtype(config.precision, self.device)
        if self.autocast is not None and self.device.type == "cpu" and self.autocast == torch.float16:
            raise DistillError("fp16 autocast on CPU", "use fp32 or bf16 on CPU", input_name="precision")
        self._check_models()
        w = config.weights
        self.plan = feature_plan(teacher_topology, student_topology,
                                 stages=config.features != "none" and w.feat > 0,
                                 mid=config.features == "stages+mid" and w.mid_weight > 0)
        self.train_names = [n for n, _ in student.named_parameters() if self.trainable(n)]
        if not self.train_names:
            raise DistillError("nothing to train: every student parameter is frozen by this choice",
                               "choose 'all', or a student that has blocks of its own", node=node, input_name="train")
        self.trainable_params = sum(p.numel() for n, p in student.named_parameters() if self.trainable(n))
        self._estimates: dict[bool, MemoryEstimate] = {}

    # ---- checks ---------------------------------------------------------------------------------
    def _check_models(self):
        tt, st, node = self.tt, self.st, self.node
        if (tt.context_dim, tt.adm_in_channels, tt.in_channels, tt.out_channels) != \
                (st.context_dim, st.adm_in_channels, st.in_channels, st.out_channels):
            raise DistillError(
                f"teacher ({tt.family}, context {tt.context_dim}, {tt.in_channels} latent channels) and student "
                f"({st.family}, context {st.context_dim}, {st.in_channels} latent channels) do not share latent "
                "space and conditioning", "distil a student of the teacher's family", node=node, input_name="student")
        c = self.data.latents.shape[1]
        if c != st.in_channels:
            raise DistillError(f"the latents have {c} channels, the models take {st.in_channels}",
                               "encode the images with this model family's VAE", node=node, input_name="latents")
        if self.data.context_dim != st.context_dim:
            raise DistillError(f"the conditioning is {self.data.context_dim} wide, the models take {st.context_dim}",
                               "encode the captions with this model family's text encoder (CLIP)", node=node,
                               input_name="conditioning")
        if bool(st.adm_in_channels) != (self.data._y is not None):
            raise DistillError("SDXL-class models need pooled/size conditioning (and others must not get it)",
                               "make the conditioning with this family's CLIP Text Encode node", node=node,
                               input_name="conditioning")

    # ---- memory ---------------------------------------------------------------------------------
    def estimate_memory(self, *, teacher_resident: bool = False) -> MemoryEstimate:
        if teacher_resident in self._estimates:
            return self._estimates[teacher_resident]
        cfg = self.cfg
        h, w = self.data.latents.shape[-2:]
        act_dtype = self.autocast or torch.float32
        itemsize = torch.finfo(act_dtype).bits // 8
        frozen_bytes = sum(p.numel() for n, p in self.student.named_parameters() if not self.trainable(n)) * itemsize
        buffers = sum(b.numel() * b.element_size() for b in self.student.buffers())
        student_w = self.trainable_params * 4 + frozen_bytes + buffers
        teacher_w = 0 if teacher_resident else sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        y_dim = self.st.adm_in_channels or 0
        prof = _activation_profile(self.student, (1, self.st.in_channels, h, w),
                                   (1, self.data.max_tokens, self.st.context_dim), y_dim, act_dtype, self.trainable)
        if self.semantic is not None:  # VGG activations of the student's x0 preview (about 3 per conv output)
            px = h * w
            vgg = (64 * 2 * px + 128 * 2 * px / 4 + 256 * 3 * px / 16) * 3 * 4
            for k in list(prof):
                prof[k] += int(vgg)
        est = MemoryEstimate(
            student_weights=student_w, teacher_weights=teacher_w, grads=self.trainable_params * 4,
            optimizer=self.trainable_params * 8, ema=self.trainable_params * 4 if cfg.ema_decay > 0 else 0,
            autocast_copies=self.trainable_params * itemsize if self.autocast is not None else 0,
            activations=prof[cfg.gradient_checkpointing] * cfg.batch_size,
            workspace=prof[("work", cfg.gradient_checkpointing)] * cfg.batch_size, batch_size=cfg.batch_size,
            latent_hw=(int(h), int(w)), checkpointing=cfg.gradient_checkpointing,
            trainable_params=self.trainable_params, per_sample_activations=prof)
        self._estimates[teacher_resident] = est
        return est

    def check_memory(self, free_bytes: int | None = None, *, teacher_resident: bool = False,
                     extra_fixes: list[str] | None = None, headroom: float = 0.9) -> MemoryEstimate:
        """Raise :class:`TrainingMemoryError` (with the figures and the fix) if the run cannot fit."""
        est = self.estimate_memory(teacher_resident=teacher_resident)
        free = _free_memory(self.device) if free_bytes is None else int(free_bytes)
        if est.total <= free * headroom:
            return est
        fixes = []
        if not est.checkpointing:
            alt = est.with_(checkpointing=True)
            fixes.append(f"turn on gradient_checkpointing (~{alt.total / GIB:.2f} GiB)")
        for b in range(est.batch_size - 1, 0, -1):
            alt = est.with_(batch_size=b)
            if alt.total <= free * headroom or b == 1:
                acc = math.ceil(est.batch_size * self.cfg.grad_accum / b)
                fixes.append(f"batch_size {b} with gradient_accumulation {acc} (same samples per step, "
                             f"~{alt.total / GIB:.2f} GiB)")
                break
        fixes += list(extra_fixes or [])
        fixes.append("a smaller latent size (images) or a GPU with more memory")
        raise TrainingMemoryError(
            f"distillation needs {est.describe()}; {free / GIB:.2f} GiB is free on {self.device}",
            "; or ".join(fixes), estimate=est, free_bytes=free, node=self.node, input_name="batch_size")

    # ---- setup ----------------------------------------------------------------------------------
    def _trainable_copy(self) -> torch.nn.Module:
        """The student copied onto the device: trainable parameters fp32, frozen ones in the compute dtype."""
        frozen_dtype = self.autocast or torch.float32
        memo = {}
        for name, p in self.student.named_parameters():
            train = self.trainable(name)
            dt = torch.float32 if train or not p.is_floating_point() else frozen_dtype
            memo[id(p)] = torch.nn.Parameter(p.detach().to(self.device, dt, copy=True), requires_grad=train)
        for b in self.student.buffers():
            memo[id(b)] = b.detach().to(self.device, copy=True)
        model = copy.deepcopy(self.student, memo)
        for m in model.modules():  # ComfyUI lowvram casting / weight patches: weights are plain here
            if getattr(m, "comfy_cast_weights", False):
                m.comfy_cast_weights = False
            for attr in ("weight_function", "bias_function"):
                if isinstance(getattr(m, attr, None), list):
                    setattr(m, attr, [])
        model.train()
        return model

    def _opts(self, teacher: bool) -> dict:
        opts = dict(self.teacher_opts) if teacher else {}
        if self.cfg.attention == "sdpa":
            opts["optimized_attention_override"] = sdpa_attention
        return opts

    def _autocast(self):
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _teacher_dtype(self) -> torch.dtype:
        """The dtype the teacher computes in (its inputs are cast to it, as ComfyUI's apply_model does)."""
        if self._t_dtype is not None:
            return self._t_dtype
        for p in self.teacher.parameters():
            if p.is_floating_point() and p.element_size() >= 2:
                return p.dtype
        return torch.float32

    def _run_teacher(self, nb: NoisedBatch, ctx, y):
        dt = self._teacher_dtype()
        if self.autocast is not None and dt in (torch.float16, torch.bfloat16):  # compute in its own half dtype
            amp = torch.autocast(self.device.type, dtype=dt)
        else:
            amp = self._autocast()
        with torch.no_grad(), amp:
            out = self.teacher(nb.x_in.to(dt), nb.timesteps, context=ctx.to(dt),
                               y=None if y is None else y.to(dt), transformer_options=self._opts(True))
        return out.float()

    def _run_student(self, model, nb: NoisedBatch, ctx, y):
        with self._autocast():
            out = model(nb.x_in, nb.timesteps, context=ctx, y=y, transformer_options=self._opts(False))
        return out.float()

    # ---- sampling order -------------------------------------------------------------------------
    def draw(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample indices, timesteps, noise) of micro-batch ``micro`` of step ``step`` (CPU tensors)."""
        return draw_batch(self.cfg.seed, step, micro, n_data=len(self.data), batch_size=self.cfg.batch_size,
                          grad_accum=self.cfg.grad_accum, num_timesteps=self.schedule.num_timesteps,
                          sample_shape=tuple(self.data.latents.shape[1:]))

    # ---- held-out error -------------------------------------------------------------------------
    def _heldout_batches(self):
        """Fixed (x_in, timesteps, ctx, y, teacher output) batches: each held-out sample at
        ``heldout_timesteps`` stratified timesteps with fixed noise."""
        if self.heldout is None or len(self.heldout) == 0:
            return []
        k, T = self.cfg.heldout_timesteps, self.schedule.num_timesteps
        g = _generator(self.cfg.seed, "heldout")
        batches = []
        n = len(self.heldout)
        order = [(i, j) for j in range(k) for i in range(n)]
        for s in range(0, len(order), self.cfg.batch_size):
            chunk = order[s:s + self.cfg.batch_size]
            idx = torch.tensor([i for i, _ in chunk])
            x0, ctx, y = self.heldout.batch(idx)
            u = torch.rand(len(chunk), generator=g)
            t = torch.tensor([min(T - 1, int((j + float(uu)) * T / k)) for (_, j), uu in zip(chunk, u)])
            noise = torch.randn(x0.shape, generator=g)
            nb = self.schedule.noised(x0.to(self.device), noise.to(self.device), t)
            ctx = ctx.to(self.device)
            y = None if y is None else y.to(self.device)
            t_out = self._run_teacher(nb, ctx, y)
            batches.append((nb, ctx, y, t_out))
        return batches

    def _heldout_error(self, model) -> float:
        if not self._held:
            return float("nan")
        total, count = 0.0, 0
        with torch.no_grad():
            for nb, ctx, y, t_out in self._held:
                s_out = self._run_student(model, nb, ctx, y)
                total += float(F.mse_loss(s_out, t_out, reduction="sum"))
                count += t_out.numel()
        return total / count

    # ---- one step -------------------------------------------------------------------------------
    def _step(self, model, step: int) -> dict[str, float]:
        cfg, w = self.cfg, self.cfg.weights
        parts_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx, t, noise = self.draw(step, micro)
            x0, ctx, y = self.data.batch(idx)
            nb = self.schedule.noised(x0.to(self.device), noise.to(self.device), t)
            ctx = ctx.to(self.device)
            y = None if y is None else y.to(self.device)
            self._t_taps.recording = True
            try:
                t_out = self._run_teacher(nb, ctx, y)
            finally:
                self._t_taps.recording = False
            self._s_taps.recording = True
            try:
                s_out = self._run_student(model, nb, ctx, y)
            finally:
                self._s_taps.recording = False
            parts: dict[str, torch.Tensor] = {}
            parts["task"] = F.mse_loss(s_out, nb.target.float())
            parts["out"] = F.mse_loss(s_out, t_out)
            loss = w.task * parts["task"] + w.out * parts["out"]
            feat = None
            for p in self.plan.points:
                m = F.mse_loss(self._s_taps.out[p.name].float(), self._t_taps.out[p.name].detach().float())
                if p.kind == "mid":
                    parts["mid"] = m
                    loss = loss + w.mid_weight * m
                else:
                    feat = m if feat is None else feat + m
            if feat is not None:
                parts["feat"] = feat
                loss = loss + w.feat * feat
            if self.semantic is not None and w.vgg_weight > 0:
                with self._autocast():
                    t_feats = self.semantic.teacher_features(self.schedule.predict_x0(nb, t_out))
                    parts["vgg"] = self.semantic(self.schedule.predict_x0(nb, s_out), t_feats, nb.alpha_bar)
                loss = loss + w.vgg_weight * parts["vgg"]
            self._t_taps.out.clear()
            self._s_taps.out.clear()
            scaled = loss / cfg.grad_accum
            if self._scaler is not None:
                self._scaler.scale(scaled).backward()
            else:
                scaled.backward()
            parts["loss"] = loss
            values = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # one device sync
            for k, v in zip(parts, values):
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
        params = self._params
        if self._scaler is not None:
            self._scaler.unscale_(self._opt)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if self._scaler is not None:
            self._scaler.step(self._opt)
            self._scaler.update()
        else:
            self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        if self._ema is not None:
            self._ema_updates += 1
            n = self._ema_updates
            decay = 0.0 if n <= 1 else min(cfg.ema_decay, n / (n + 9))
            with torch.no_grad():
                ema = list(self._ema.values())
                torch._foreach_mul_(ema, decay)
                torch._foreach_add_(ema, [p.detach() for p in params], alpha=1.0 - decay)
        return parts_sum

    # ---- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_tensors(self, model, step: int) -> tuple[dict, dict]:
        tensors = {f"student.{k}": v for k, v in model.state_dict().items()}
        for name, p in zip(self.train_names, self._params):
            st = self._opt.state.get(p, {})
            if "exp_avg" in st:
                tensors[f"optim.{name}.exp_avg"] = st["exp_avg"]
                tensors[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"]
            if self._ema is not None:
                tensors[f"ema.{name}"] = self._ema[name]
        tensors["history.loss"] = torch.tensor(self._losses, dtype=torch.float64)
        for k, v in self._parts.items():
            tensors[f"history.{k}"] = torch.tensor(v, dtype=torch.float64)
        if self._curve:
            tensors["history.heldout"] = torch.tensor(self._curve, dtype=torch.float64)
        opt_steps = 0
        for p in self._params:
            s = self._opt.state.get(p, {}).get("step")
            if s is not None:
                opt_steps = int(s)
                break
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": str(step),
                "optimizer_steps": str(opt_steps), "ema_updates": str(self._ema_updates),
                "config": self.cfg.to_json(), "data": self.data.fingerprint(),
                "heldout_before": repr(self._heldout_before),
                "scaler": json.dumps(self._scaler.state_dict() if self._scaler is not None else {}),
                "teacher_structure": self.tt.describe(), "student_structure": self.st.describe(),
                "trainable": json.dumps(self.train_names)}
        return tensors, meta

    def _saved_at(self, checkpoints: list[str]) -> bool:
        """Whether the last checkpoint written holds the current step."""
        return bool(checkpoints) and self._last_saved == len(self._losses)

    def _save(self, model, step: int) -> str:
        tensors, meta = self._checkpoint_tensors(model, step)
        path = _atomic_save(tensors, meta, self.cfg.checkpoint_dir, f"{self.cfg.checkpoint_prefix}_{step:07d}")
        self._last_saved = step
        log.info("distillation checkpoint at step %d: %s", step, path)
        return path

    def _resume(self, model, path: str) -> tuple[int, list[str]]:
        from safetensors import safe_open

        meta = read_checkpoint_meta(path)
        notes = []
        step = int(meta["step"])
        if step >= self.cfg.steps:
            raise CheckpointError(f"the checkpoint is at step {step}, the run asks for {self.cfg.steps} steps",
                                  f"set steps above {step}", path=path, input_name="steps")
        names = json.loads(meta.get("trainable", "[]"))
        if names != self.train_names:
            raise CheckpointError("the checkpoint trained a different set of student parameters",
                                  "resume with the same student and 'train' choice", path=path, input_name="resume")
        old = json.loads(meta["config"])
        new = json.loads(self.cfg.to_json())
        diff = [k for k in _REPRODUCING if old.get(k) != new.get(k)]
        if diff:
            notes.append("settings changed since the checkpoint (the run will not reproduce an uninterrupted "
                         "one): " + ", ".join(diff))
        if meta.get("data") != self.data.fingerprint():
            notes.append("the training data differ from the checkpoint's")
        sd = model.state_dict()
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [k for k in sd if f"student.{k}" not in keys]
            if missing:
                raise CheckpointError(f"the checkpoint lacks {len(missing)} student weights (e.g. {missing[0]})",
                                      "resume with the same student model", path=path, input_name="resume")
            with torch.no_grad():
                for k, v in sd.items():
                    t = f.get_tensor(f"student.{k}")
                    if t.shape != v.shape:
                        raise CheckpointError(f"'{k}' has shape {tuple(t.shape)} in the checkpoint, "
                                              f"{tuple(v.shape)} in the student", "resume with the same student",
                                              path=path, input_name="resume")
                    v.copy_(t)
            opt_steps = int(meta.get("optimizer_steps", "0"))
            opt_state = {}
            for i, name in enumerate(self.train_names):
                if f"optim.{name}.exp_avg" in keys:  # load_state_dict puts step/moments where the optimizer wants
                    opt_state[i] = {"step": torch.tensor(float(opt_steps)),
                                    "exp_avg": f.get_tensor(f"optim.{name}.exp_avg"),
                                    "exp_avg_sq": f.get_tensor(f"optim.{name}.exp_avg_sq")}
            self._opt.load_state_dict({"state": opt_state, "param_groups": self._opt.state_dict()["param_groups"]})
            for name in self.train_names:
                if self._ema is not None and f"ema.{name}" in keys:
                    self._ema[name].copy_(f.get_tensor(f"ema.{name}"))
            self._losses = f.get_tensor("history.loss").tolist()
            for k in keys:
                if k.startswith("history.") and k not in ("history.loss", "history.heldout"):
                    self._parts[k[len("history."):]] = f.get_tensor(k).tolist()
            if "history.heldout" in keys:
                self._curve = [(int(a), float(b)) for a, b in f.get_tensor("history.heldout").tolist()]
        self._ema_updates = int(meta.get("ema_updates", "0"))
        if self._scaler is not None and meta.get("scaler") not in (None, "{}"):
            self._scaler.load_state_dict(json.loads(meta["scaler"]))
        self._heldout_before = float(meta.get("heldout_before", "nan"))
        return step, notes

    # ---- the run --------------------------------------------------------------------------------
    def run(self, *, progress: Callable[[int, int, float], None] | None = None,
            cancel: Callable[[], bool] | None = None, resume: str | None = None) -> TrainResult:
        """Train. ``cancel()`` is called before every step: True stops after the last finished step (the
        result is returned, a checkpoint written when checkpointing is on); an exception it raises is
        re-raised after that checkpoint. ``progress(step, total, loss)`` is called after every step."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(progress, cancel, resume)

    def _run(self, progress, cancel, resume) -> TrainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        model = self._trainable_copy()
        ckpt_handle = enable_gradient_checkpointing(model) if cfg.gradient_checkpointing else None
        self._t_taps = _Taps(self.teacher, {p.name: p.teacher for p in self.plan.points})
        self._s_taps = _Taps(model, {p.name: p.student for p in self.plan.points})
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.train_names]
        self._opt = torch.optim.AdamW(self._params, lr=cfg.learning_rate, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                                      fused=True if self.device.type == "cuda" else None)
        self._scaler = torch.amp.GradScaler(self.device.type) if self.autocast == torch.float16 else None
        self._ema = {n: p.detach().clone() for n, p in zip(self.train_names, self._params)} \
            if cfg.ema_decay > 0 else None
        self._ema_updates = 0
        self._losses: list[float] = []
        self._parts: dict[str, list[float]] = {}
        self._curve: list[tuple[int, float]] = []
        self._heldout_before = float("nan")
        self._last_saved = -1
        if self.semantic is not None:
            self.semantic = self.semantic.to(self.device)
        checkpoints: list[str] = []
        notes: list[str] = []
        cancelled = False
        start = 0
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            self._held = self._heldout_batches()
            if resume:
                start, notes = self._resume(model, resume)
            else:
                self._heldout_before = self._heldout_error(model)
                if self._held:
                    self._curve.append((0, self._heldout_before))
            for step in range(start, cfg.steps):
                if cancel is not None:
                    try:
                        stop = cancel()
                    except BaseException:
                        if cfg.checkpoint_dir and len(self._losses) > start and not self._saved_at(checkpoints):
                            checkpoints.append(self._save(model, len(self._losses)))
                        raise
                    if stop:
                        cancelled = True
                        break
                parts = self._step(model, step)
                self._losses.append(parts["loss"])
                for k, v in parts.items():
                    if k != "loss":
                        self._parts.setdefault(k, []).append(v)
                done = step + 1
                if cfg.heldout_every and done % cfg.heldout_every == 0 and done < cfg.steps and self._held:
                    self._curve.append((done, self._heldout_error(model)))
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    checkpoints.append(self._save(model, done))
                if progress is not None:
                    progress(done, cfg.steps, parts["loss"])
            done = len(self._losses)
            if cancelled and cfg.checkpoint_dir and done > start and not self._saved_at(checkpoints):
                checkpoints.append(self._save(model, done))
            after_raw = self._heldout_error(model)
            if self._ema is not None:
                with torch.no_grad():
                    named = dict(model.named_parameters())
                    for n in self.train_names:
                        named[n].copy_(self._ema[n])
                after = self._heldout_error(model)
            else:
                after = after_raw
            if self._held:
                self._curve.append((done, after))
            measured = bool(self._held)
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        finally:
            self._t_taps.remove()
            self._s_taps.remove()
            if ckpt_handle is not None:
                ckpt_handle.remove()
            if was_training:
                self.teacher.train()
            self._held = []
            self._opt = None
            self._ema = None
            del model
        seconds = time.perf_counter() - t0
        done = len(self._losses)
        samples = (done - start) * cfg.batch_size * cfg.grad_accum
        report = self._report(done, start, samples, seconds, after if measured else None, after_raw, cancelled,
                              checkpoints, notes)
        if not measured:
            after = after_raw = float("nan")
        return TrainResult(state, list(self._losses), {k: list(v) for k, v in self._parts.items()},
                           self._heldout_before, after, after_raw, list(self._curve), done, samples, seconds,
                           checkpoints, cancelled, start, report)

    def _report(self, done, start, samples, seconds, after, after_raw, cancelled, checkpoints, notes) -> list[str]:
        cfg = self.cfg
        lines = [f"distilled {done} of {cfg.steps} steps" + (" (cancelled)" if cancelled else "")
                 + (f", resumed at step {start}" if start else "")
                 + f": {samples} samples seen in this run, {seconds:.1f} s"
                 + (f" ({seconds / max(1, done - start):.2f} s/step)" if done > start else ""),
                 f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}, lr {cfg.learning_rate:g} (AdamW, "
                 f"weight decay {cfg.weight_decay:g}, grad-norm clip {cfg.grad_clip:g}), loss weights: "
                 f"{cfg.weights.describe()}",
                 f"trains {self.trainable_params:,} of {sum(p.numel() for p in self.student.parameters()):,} "
                 "student parameters"]
        if after is not None:
            ema = f" (EMA weights; raw weights {after_raw:.5f})" if cfg.ema_decay > 0 else ""
            lines.append(f"held-out output-KD error (MSE student vs teacher output): {self._heldout_before:.5f} "
                         f"-> {after:.5f}{ema}")
        else:
            lines.append("no held-out samples: held-out error not measured")
        if self._losses:
            lines.append(f"training loss: first {self._losses[0]:.5f}, last {self._losses[-1]:.5f}")
        lines += self.plan.report_lines()
        if checkpoints:
            lines.append(f"checkpoints: {', '.join(os.path.basename(c) for c in checkpoints)}")
        lines += notes
        return lines
