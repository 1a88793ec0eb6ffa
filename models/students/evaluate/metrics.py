"""The metric maths, on 8-bit images as saved and on feature vectors.

Library code wherever a well-kept library has the maths:

* same-seed agreement: torchmetrics' ``peak_signal_noise_ratio``, ``structural_similarity_index_measure`` and
  ``multiscale_structural_similarity_index_measure`` (images scaled to [0, 1], one value per image pair);
* Frechet distance and KID on any features: torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance`` fed with the features themselves (:class:`Features`, an identity "network"), in
  float64; against reference statistics (pytorch-fid's ``mu`` / ``sigma``), the same metric with its reference
  state set from those statistics;
* Inception Score: torch-fidelity's ``isc_features_to_metric`` on the unbiased logits (BK-SDM's protocol);
* confidence intervals: ``scipy.stats.bootstrap`` (percentile method, seeded).

Written here because no well-kept library has it: CMMD (Jayasumana et al., arXiv 2401.09603; the reference
implementation is google-research ``cmmd/distance.py``): the biased (minimum-variance) MMD estimator with a
Gaussian RBF kernel, sigma 10, scaled by 1000, on L2-normalised CLIP image embeddings; and, for the bootstrap
only, the Frechet distance through the identity ``tr sqrt(S1 S2) = ||A^T B||_*`` (nuclear norm; ``S1 = A A^T``,
``S2 = B B^T`` with ``A``, ``B`` the centred features over ``sqrt(n - 1)``), which is exact and costs
``n x m`` instead of ``d x d`` matrices when there are fewer images than feature dimensions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import torch

#: CMMD's constants (google-research cmmd/distance.py: _SIGMA, _SCALE)
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
#: bootstrap resamples: per-image means, and distribution metrics (each resample recomputes the metric)
BOOTSTRAP_MEAN = 2000
BOOTSTRAP_DIST = 200
CONFIDENCE = 0.95
#: above this many images the distribution metrics get no bootstrap interval (its cost grows with n^2 d)
BOOTSTRAP_MAX_IMAGES = 2000


def quantize(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[N, H, W, C]`` floats in 0..1 -> the uint8 pixels SaveImage writes (``clip(255 x, 0, 255)``
    truncated to an integer, as ``numpy.astype(uint8)`` does)."""
    return (images.detach().float().cpu() * 255.0).clamp(0, 255).to(torch.uint8)


def unit(images_u8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] (what torchmetrics' image metrics take)."""
    return images_u8[..., :3].permute(0, 3, 1, 2).to(dtype) / 255.0


# ------------------------------------------------------------------------------------------------
# same-seed agreement


def ms_ssim_fits(height: int, width: int) -> bool:
    """Whether MS-SSIM (5 scales, 11-pixel Gaussian window) can be computed at this size (torchmetrics' rule:
    the side over 16 must exceed 10)."""
    return height // 16 > 10 and width // 16 > 10


def pair_scores(teacher_u8: torch.Tensor, student_u8: torch.Tensor, *, chunk: int = 16,
                device=None) -> dict[str, torch.Tensor]:
    """Per image pair: ``psnr`` (dB, data range 1), ``ssim`` and, where the size allows, ``ms_ssim``; 8-bit
    ``[N, H, W, 3]`` images, compared as float32 in [0, 1] (float64 convolutions have no fast CPU kernels: 100x
    slower for the same figures within 1e-6) on ``device``, the CPU by default. Identical images give an infinite
    PSNR."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if teacher_u8.shape != student_u8.shape:
        raise ValueError(f"image shapes differ: {tuple(teacher_u8.shape)} vs {tuple(student_u8.shape)}")
    h, w = teacher_u8.shape[1:3]
    out: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}
    if ms_ssim_fits(h, w):
        out["ms_ssim"] = []
    for s in range(0, teacher_u8.shape[0], chunk):
        t, p = unit(teacher_u8[s:s + chunk].to(device)), unit(student_u8[s:s + chunk].to(device))
        out["psnr"].append(peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        out["ssim"].append(structural_similarity_index_measure(p, t, data_range=1.0, reduction="none"))
        if "ms_ssim" in out:
            out["ms_ssim"].append(multiscale_structural_similarity_index_measure(p, t, data_range=1.0,
                                                                                 reduction="none"))
    return {k: torch.cat([v.reshape(-1) for v in vs]).double().cpu() for k, vs in out.items()}


# ------------------------------------------------------------------------------------------------
# distribution distances on features


class Features(torch.nn.Module):
    """The identity, as torchmetrics' "feature network": the metrics then take feature vectors directly."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield


def _fid_metric(dim: int):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute False: under torch.distributed the metric holds all the features on the one rank computing it
    m = FrechetInceptionDistance(feature=Features(dim), normalize=True, sync_on_compute=False)
    m.set_dtype(torch.float64)
    return m


def frechet_distance(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two sets of feature vectors ``[n, d]`` (FID's formula),
    by torchmetrics in float64; with fewer vectors than dimensions (singular covariances) by the exact
    nuclear-norm form (:func:`frechet_fast`: ``n x m`` instead of ``d x d`` eigenvalues, the same value)."""
    if reference.shape[0] < 2 or other.shape[0] < 2:
        raise ValueError("a Frechet distance needs at least 2 feature vectors on each side")
    if max(reference.shape[0], other.shape[0]) < reference.shape[1]:
        return frechet_fast(reference, other)
    m = _fid_metric(reference.shape[1])
    m.update(reference.double(), real=True)
    m.update(other.double(), real=False)
    return float(m.compute())


def frechet_distance_to_stats(mu: np.ndarray, sigma: np.ndarray, other: torch.Tensor, n_ref: int = 50_000) -> float:
    """Frechet distance of feature vectors ``[n, d]`` from reference statistics (pytorch-fid's ``mu``, ``sigma``),
    by torchmetrics: its reference state is set to the sums those statistics stand for (``n_ref`` images; the
    result does not depend on it beyond float64 rounding)."""
    mu_t = torch.as_tensor(np.asarray(mu), dtype=torch.float64).reshape(-1)
    sig_t = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
    m = _fid_metric(mu_t.shape[0])
    m.real_features_sum = mu_t * n_ref
    m.real_features_cov_sum = sig_t * (n_ref - 1) + n_ref * torch.outer(mu_t, mu_t)
    m.real_features_num_samples = torch.tensor(n_ref, dtype=torch.long)
    m.update(other.double(), real=False)
    return float(m.compute())


def kid(reference: torch.Tensor, other: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID (unbiased MMD^2 with the cubic polynomial kernel) over random subsets, by torchmetrics;
    subsets of ``min(subset_size, n)`` vectors, drawn from a seeded generator (the same result every run)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(reference.shape[0], other.shape[0])
    if n < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    with _quiet():
        m = KernelInceptionDistance(feature=Features(reference.shape[1]), subsets=subsets,
                                    subset_size=min(subset_size, n), normalize=True, sync_on_compute=False)
    m.update(reference.double(), real=True)
    m.update(other.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rbf_mean(x: torch.Tensor, y: torch.Tensor, gamma: float, block: int = 4096) -> float:
    """mean over all (i, j) of exp(-gamma ||x_i - y_j||^2), in row blocks (no n x m matrix held for large sets)."""
    total = 0.0
    y2 = (y * y).sum(1)
    for s in range(0, x.shape[0], block):
        xb = x[s:s + block]
        d2 = (xb * xb).sum(1)[:, None] + y2[None, :] - 2.0 * xb @ y.T
        total += float(torch.exp(-gamma * d2).sum())
    return total / (x.shape[0] * y.shape[0])


def cmmd(reference: torch.Tensor, other: torch.Tensor, *, normalise: bool = True) -> float:
    """CMMD (arXiv 2401.09603): ``1000 x (mean k(x, x') + mean k(y, y') - 2 mean k(x, y))`` with the Gaussian
    RBF kernel of bandwidth 10, on L2-normalised CLIP embeddings (google-research cmmd/distance.py)."""
    x = l2_normalise(reference) if normalise else reference.double()
    y = l2_normalise(other) if normalise else other.double()
    gamma = 1.0 / (2.0 * CMMD_SIGMA ** 2)
    return CMMD_SCALE * (_rbf_mean(x, x, gamma) + _rbf_mean(y, y, gamma) - 2.0 * _rbf_mean(x, y, gamma))


def inception_score(logits: torch.Tensor, *, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits, by torch-fidelity's ``isc_features_to_metric``
    on the unbiased logits (its default shuffle, seed 2020); fewer splits when there are fewer images."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(splits, logits.shape[0]))
    out = isc_features_to_metric(logits.double(), splits=splits, shuffle=True, rng_seed=2020)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


# ------------------------------------------------------------------------------------------------
# confidence intervals


def mean_ci(values: torch.Tensor, *, seed: int = 0, n_resamples: int = BOOTSTRAP_MEAN,
            level: float = CONFIDENCE) -> tuple[float, float] | None:
    """Bootstrap confidence interval of the mean of per-image values (None below 3 finite values)."""
    from scipy.stats import bootstrap

    v = values.double().cpu().numpy()
    v = v[np.isfinite(v)]
    if v.size < 3 or np.all(v == v[0]):
        return None
    res = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def resample_ci(n: int, statistic: Callable[[np.ndarray], float], *, seed: int = 0,
                n_resamples: int = BOOTSTRAP_DIST, level: float = CONFIDENCE) -> tuple[float, float] | None:
    """Bootstrap confidence interval of a statistic of ``n`` paired images, given as a function of the image
    indices of one resample (the same indices on both sides: teacher and student image of one seed stay
    together). None below 3 images or above :data:`BOOTSTRAP_MAX_IMAGES`."""
    from scipy.stats import bootstrap

    if n < 3 or n > BOOTSTRAP_MAX_IMAGES:
        return None
    res = bootstrap((np.arange(n),), lambda idx: statistic(np.asarray(idx, dtype=np.int64)), n_resamples=n_resamples,
                    confidence_level=level, method="percentile", vectorized=False, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def frechet_fast(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Frechet distance by the nuclear-norm identity (see the module docstring): the same value as
    :func:`frechet_distance`, at the cost of ``n x m`` matrices when ``n, m < d`` (used by the bootstrap)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    a = (x - mx) / (x.shape[0] - 1) ** 0.5
    b = (y - my) / (y.shape[0] - 1) ** 0.5
    if min(x.shape[0], y.shape[0]) < x.shape[1]:
        cross = torch.linalg.matrix_norm(a @ b.T, ord="nuc")
    else:
        s1, s2 = a.T @ a, b.T @ b
        cross = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(((mx - my) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2.0 * cross)


def kid_fast(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor, idx: np.ndarray) -> float:
    """Unbiased MMD^2 (KID's estimator) of one resample, from kernel matrices computed once (off-diagonal
    means; a repeated index counts like distinct images, as in a resampled set)."""
    i = torch.as_tensor(idx)
    a, b, c = kxx[i][:, i], kyy[i][:, i], kxy[i][:, i]
    n = len(idx)
    return float((a.sum() - a.diagonal().sum()) / (n * (n - 1)) + (b.sum() - b.diagonal().sum()) / (n * (n - 1))
                 - 2.0 * c.mean())


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel: ``(x . y / d + 1)^3``."""
    return (x.double() @ y.double().T / x.shape[1] + 1.0) ** 3


def rbf_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CMMD's kernel on already normalised vectors."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return torch.exp(-d2 / (2.0 * CMMD_SIGMA ** 2))
