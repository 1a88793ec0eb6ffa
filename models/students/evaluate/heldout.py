"""The evaluator the distillation engine calls every few steps (``students.eval_hook.StudentEvaluator``).

On a fixed held-out set of conditionings (the data's own: no text encoder needed), teacher and student are
sampled from the same noise with a small deterministic sampler (Euler, k-diffusion's contract), decoded by the
teacher's VAE (the ``decode`` the caller gives), quantised to 8 bit as saved, and judged with
:func:`report.judge`: ``psnr``, ``ssim``, ``ms_ssim`` where the size allows, and with an image feature function
(CLIP vision) ``clip_image_cosine``, ``fd_clip``, ``kid_clip`` and ``cmmd``; each with its bootstrap interval
(``*_ci_low`` / ``*_ci_high``). The teacher's images (and features) are computed on the first call and kept.

Conditional only (guidance 1: the held-out set has no negative conditioning); sigmas are the schedule's, at
``steps`` timesteps evenly spaced from the last training timestep to the first, then 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .metrics import ms_ssim_fits, quantize
from .report import ImageSet, judge


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler method (Karras et al. 2022, Algorithm 2 without churn): ``x <- x + (x - D(x, s_i)) / s_i (s_{i+1} -
    s_i)``."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


class Denoiser:
    """A bare ComfyUI ``UNetModel`` as a k-diffusion denoiser ``D(x, sigma)`` in the schedule's parameterisation
    (ComfyUI's ``calculate_input`` / ``timestep`` / ``calculate_denoised`` of an epsilon or v model)."""

    def __init__(self, unet: torch.nn.Module, schedule):
        self.unet, self.schedule = unet, schedule

    def __call__(self, x, sigma, context=None, y=None, timestep=None):
        p = next(self.unet.parameters())
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        x_in = x / torch.sqrt(s * s + 1.0)
        out = self.unet(x_in.to(p.dtype), timestep.to(p.device).float(), context=context.to(p.dtype),
                        y=None if y is None else y.to(p.dtype)).float()
        if self.schedule.prediction == "eps":
            return x - out * s
        return x / (s * s + 1.0) - out * s / torch.sqrt(s * s + 1.0)


class HeldoutEvaluator:
    """``(student UNet, step) -> {metric: value}`` on held-out conditionings (see the module docstring).

    ``teacher``: ComfyUI's ``UNetModel`` (``patcher.model.diffusion_model``); ``schedule``: the distillation's
    ``NoiseSchedule``; ``samples``: a ``KDData`` (or any source with ``buckets()`` and ``batch(idx)``) whose
    conditionings (and latent shapes) are used; ``decode``: latents in the model's space -> images ``[N, H, W, 3]``
    in 0..1 (``nodes.host.judging.latent_decoder``); ``image_features``: images -> embeddings ``[N, D]`` or None.
    """

    def __init__(self, teacher: torch.nn.Module, schedule, samples, decode: Callable[[torch.Tensor], torch.Tensor], *,
                 image_features: Callable[[torch.Tensor], torch.Tensor] | None = None, steps: int = 8, seed: int = 0,
                 batch_size: int = 4, max_samples: int | None = None):
        self.teacher, self.schedule, self.samples = teacher, schedule, samples
        self.decode, self.image_features = decode, image_features
        self.steps, self.seed, self.batch_size = max(1, int(steps)), int(seed), max(1, int(batch_size))
        order = [i for _, idx in samples.buckets() for i in idx]
        self.indices = order[:max_samples] if max_samples else order
        self._teacher_set: ImageSet | None = None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics every call returns (``students.eval_hook``; their ``*_ci_low`` / ``*_ci_high`` bounds
        come too): same-seed agreement always (``ms_ssim`` where every held-out size allows it), and with an image
        feature function the CLIP metrics (the distribution distances from two held-out samples on)."""
        keep = set(self.indices)
        sizes = [(shape[-2] * 8, shape[-1] * 8) for shape, idx in self.samples.buckets() if keep.intersection(idx)]
        names = ["psnr", "ssim"] + (["ms_ssim"] if sizes and all(ms_ssim_fits(h, w) for h, w in sizes) else [])
        if self.image_features is not None:
            names.append("clip_image_cosine")
            if len(self.indices) >= 2:
                names += ["fd_clip", "kid_clip", "kid_clip_std", "cmmd"]
        return tuple(names)

    def _plan(self, device):
        sig, ts = self.schedule.tables(device)
        n = len(sig)
        idx = torch.linspace(n - 1, 0, self.steps).round().long().to(device)
        sigmas = torch.cat([sig[idx], sig.new_zeros(1)])
        return sigmas, ts[idx]

    def _noise(self, i: int, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.randn(shape, generator=g)

    @torch.no_grad()
    def images(self, unet: torch.nn.Module) -> torch.Tensor:
        """8-bit images ``[N, H, W, 3]`` of ``unet`` on the held-out set (each sample's noise from its index)."""
        device = next(unet.parameters()).device
        sigmas, timesteps = self._plan(device)
        den = Denoiser(unet, self.schedule)
        shapes = {i: tuple(shape) for shape, idx in self.samples.buckets() for i in idx}
        out = {}
        pending = list(self.indices)
        while pending:
            shape = shapes[pending[0]]
            batch = [i for i in pending if shapes[i] == shape][:self.batch_size]
            pending = [i for i in pending if i not in batch]
            _, ctx, y = self.samples.batch(torch.tensor(batch))
            noise = torch.stack([self._noise(i, shape) for i in batch]).to(device)
            x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
            ctx, y = ctx.to(device), None if y is None else y.to(device)

            def model(x_, s_, context=ctx, y=y):
                j = int((sigmas[:-1] - s_[0]).abs().argmin())
                return den(x_, s_, context=context, y=y, timestep=timesteps[j].expand(x_.shape[0]))

            lat = sample_euler(model, x, sigmas)
            imgs = quantize(self.decode(lat))
            for i, img in zip(batch, imgs):
                out[i] = img
        return torch.stack([out[i] for i in self.indices])

    def _set(self, unet) -> ImageSet:
        imgs = self.images(unet)
        s = ImageSet(imgs)
        if self.image_features is not None:
            s.clip = self.image_features(imgs.float() / 255.0).float().cpu()
        return s

    def __call__(self, student: torch.nn.Module, step: int) -> dict[str, float]:
        if self._teacher_set is None:
            self._teacher_set = self._set(self.teacher)
        j = judge(self._teacher_set, self._set(student), seed=self.seed)
        return j.flat()
