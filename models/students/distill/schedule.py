"""Training noise with the model's own sampling semantics (ComfyUI's ``model_sampling``: ``noise_scaling``,
``calculate_input``, ``calculate_denoised``), epsilon or v targets as BK-SDM's scheduler makes them.

The per-timestep tables (sigma, the UNet's timestep input) are read from the sampling object once and kept on
the training device: nothing of a step is computed where the model's sampling object happens to live (under
ComfyUI's dynamic VRAM it stays on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import DistillError


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
        with torch.no_grad():
            sig = sampling.sigmas.detach().float()
            self.sigmas = sig.cpu().clone()
            self._timesteps = sampling.timestep(sig).detach().float().cpu().clone()  # the UNet's t per index
        self.num_timesteps = len(self.sigmas)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, UNet timesteps) per training timestep index, on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = (self.sigmas.to(device), self._timesteps.to(device))
        return self._tables[device]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> NoisedBatch:
        sigmas, steps = self.tables(x0.device)
        t = t.to(x0.device)
        sigma = sigmas[t]
        x_noisy = self.sampling.noise_scaling(sigma, noise, x0, False)
        x_in = self.sampling.calculate_input(sigma, x_noisy)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        if self.prediction == "eps":
            target = noise
        else:  # v = sqrt(a) eps - sqrt(1-a) x0 with a = 1/(1+sigma^2)
            target = (noise - s * x0) / torch.sqrt(1.0 + s * s)
        return NoisedBatch(x_in, x_noisy, steps[t], target, sigma, 1.0 / (1.0 + sigma * sigma))

    def predict_x0(self, nb: NoisedBatch, model_output: torch.Tensor) -> torch.Tensor:
        return self.sampling.calculate_denoised(nb.sigma, model_output.float(), nb.x_noisy)
