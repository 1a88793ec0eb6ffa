"""A run's settings (validated with the input each one comes from) and its result."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .errors import DistillError
from .plan import PRESETS, LossWeights

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
    keep_checkpoints: int = 0        # 0 = every checkpoint; N: the newest N of this run (older ones deleted)
    heldout_timesteps: int = 4
    attention: str = "sdpa"          # "sdpa": torch SDPA override; "host": the UNet's own backend
    max_nonfinite_steps: int = 5     # this many steps in a row with a non-finite loss or gradient stop the run
    # memory (step.py, unet.py): neither changes the loss or the weights; ema_every > 1 changes the EMA's maths
    selective_recompute: bool = False  # checkpointing off: recompute the element-wise ops, keep conv/matmul outputs
    ema_on_host: bool = False        # the EMA in host memory (on a GPU: off the device), updated by a host thread
    ema_every: int = 1               # update the EMA every N applied steps, with the product of their decays

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
            (self.keep_checkpoints >= 0, "keep_checkpoints", "keep_checkpoints", "0 (keep all) or more"),
            (self.heldout_timesteps >= 1, "heldout_timesteps", "heldout_timesteps", "at least 1"),
            (self.attention in ("sdpa", "host"), "attention", "attention", "sdpa or host"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "max_nonfinite_steps", "at least 1"),
            (self.ema_every >= 1, "ema_every", "ema_every", "at least 1 (1 = every step)"),
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


#: settings that must equal the checkpoint's for a resumed run to reproduce the uninterrupted one (with the global
#: batch, batch_size x processes, which the checkpoint records apart: any split of it over processes reproduces)
REPRODUCING = ("grad_accum", "learning_rate", "weights", "features", "seed", "ema_decay",
                "grad_clip", "weight_decay", "betas", "adam_eps", "precision", "ema_every")


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
    skipped_steps: list[int] = field(default_factory=list)  # steps whose loss or gradient was not finite
    phases: dict[str, float] = field(default_factory=dict)  # seconds: setup, first_step, steps
    world_size: int = 1
    evaluations: list[dict] = field(default_factory=list)  # {"step": s, metric: value, ...} in step order
    best: dict | None = None                                # {"metric", "value", "step"} of the best evaluation


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision choice on a device (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
