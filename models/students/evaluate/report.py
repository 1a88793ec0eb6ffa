"""Judging one student's images against its teacher's, and the report a person reads.

:func:`judge` takes the two :class:`ImageSet` s (8-bit images of the same prompts and seeds, with whatever
features were computed for them) and returns a :class:`Judgement`: every metric that applies, its bootstrap
confidence interval, the number of images it rests on, and notes saying what was left out and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..eval_hook import higher_is_better
from . import metrics as M

#: metric -> what it says; the keys are those of ``metrics.json`` and the evaluator (which way is better:
#: ``students.eval_hook.higher_is_better``, the one table of directions)
INFO: dict[str, str] = {
    "psnr": "same-seed agreement with the teacher, dB (pixels; 30+ very close, <15 different pictures)",
    "ssim": "same-seed structural similarity with the teacher (1 = identical)",
    "ms_ssim": "same-seed multi-scale SSIM with the teacher (1 = identical)",
    "clip_image_cosine": "same-seed cosine of CLIP image embeddings (1 = same content to CLIP)",
    "fd_clip": "Frechet distance of the student's images from the teacher's in CLIP space (0 = same)",
    "kid_clip": "KID in CLIP space, student vs teacher images (0 = same; unbiased, can be < 0)",
    "cmmd": "CMMD (CLIP MMD, x1000) student vs teacher images; unbiased at small counts (0 = same)",
    "clip_score": "cosine of image and prompt embeddings (BK-SDM: SD 1.4 0.2958, BK-SDM-Small 0.2677)",
    "clip_score_teacher": "the teacher's CLIP score on the same prompts and seeds",
    "clip_score_ratio": "student's CLIP score / teacher's (1 = follows the prompts as well)",
    "fid": "FID of the student's images against the teacher's (Inception pool3; 0 = same)",
    "kid": "KID (Inception) of the student's images against the teacher's (0 = same)",
    "fid_stats": "FID against the reference statistics: absolute, paper-comparable at 30K images, 256 px",
    "fid_stats_teacher": "the teacher's FID against the same reference statistics",
    "inception_score": "Inception Score of the student's images (torch-fidelity, 10 splits)",
    "inception_score_teacher": "the teacher's Inception Score",
}
ORDER = list(INFO)


@dataclass
class ImageSet:
    """8-bit images ``[N, H, W, 3]`` of one model, pair ``i`` at row ``i``, and their features (or None)."""

    images: torch.Tensor
    clip: torch.Tensor | None = None     # CLIP image embeddings [N, D] (unnormalised, as the model gives them)
    pool: torch.Tensor | None = None     # Inception pool3 [N, 2048]
    logits: torch.Tensor | None = None   # Inception unbiased logits [N, 1008]

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Judgement:
    metrics: dict[str, float] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, value: float, n: int, ci: tuple[float, float] | None = None) -> None:
        self.metrics[key] = float(value)
        self.counts[key] = int(n)
        if ci is not None:
            self.ci[key] = ci

    def flat(self) -> dict[str, float]:
        """``{metric: value, metric_ci_low: ..., metric_ci_high: ...}`` (what the in-training evaluator returns)."""
        out = dict(self.metrics)
        for k, (lo, hi) in self.ci.items():
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = lo, hi
        return out

    def to_json(self) -> dict:
        def num(v):
            return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")

        return {"metrics": {k: num(v) for k, v in self.metrics.items()},
                "ci95": {k: [num(lo), num(hi)] for k, (lo, hi) in self.ci.items()},
                "images": dict(self.counts), "notes": list(self.notes)}


def _mean(v: torch.Tensor) -> float:
    return float(v.double().mean())


def judge(teacher: ImageSet, student: ImageSet, *, text: torch.Tensor | None = None, text_note: str | None = None,
          reference_stats: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0, intervals: bool = True,
          distribution: bool = True, device=None) -> Judgement:
    """Every metric that applies to ``student`` against ``teacher`` (pair ``i`` of both made from the same prompt
    and seed). ``text``: the projected text embedding of each pair's prompt ``[N, D]`` (clip_score), or None with
    ``text_note`` saying why; ``reference_stats``: pytorch-fid (mu, sigma) for ``fid_stats``; ``distribution``
    False leaves out the distribution distances (fd, kid, cmmd, fid: meaningless on a handful of images)."""
    n = len(student)
    if len(teacher) != n:
        raise ValueError(f"{len(teacher)} teacher images for {n} student images")
    j = Judgement()
    for k, v in M.pair_scores(teacher.images, student.images, device=device).items():
        j.put(k, _mean(v), n, M.mean_ci(v, seed=seed) if intervals else None)
    h, w = teacher.images.shape[1:3]
    if not M.ms_ssim_fits(h, w):
        j.notes.append(f"ms_ssim left out: {w}x{h} is too small for 5 scales of an 11-pixel window (needs more than "
                       "160 px a side)")

    def ci(stat):
        return M.resample_ci(n, stat, seed=seed) if intervals else None

    if teacher.clip is not None and student.clip is not None:
        tc, sc = teacher.clip.double(), student.clip.double()
        cos = torch.nn.functional.cosine_similarity(tc, sc, dim=-1)
        j.put("clip_image_cosine", _mean(cos), n, M.mean_ci(cos, seed=seed) if intervals else None)
        if distribution and n >= 2:
            j.put("fd_clip", M.frechet_distance(tc, sc), n, ci(lambda i: M.frechet_fast(tc[i], sc[i])))
            kmean, kstd = M.kid(tc, sc, seed=seed)
            kxx, kyy, kxy = M.poly_kernel(tc, tc), M.poly_kernel(sc, sc), M.poly_kernel(tc, sc)
            j.put("kid_clip", kmean, n, ci(lambda i: M.kid_fast(kxx, kyy, kxy, i)))
            j.metrics["kid_clip_std"] = kstd
            tn, sn = M.l2_normalise(tc), M.l2_normalise(sc)
            rxx, ryy, rxy = M.rbf_kernel(tn, tn), M.rbf_kernel(sn, sn), M.rbf_kernel(tn, sn)

            def cmmd_of(i):
                t = torch.as_tensor(i)
                return M.CMMD_SCALE * float(rxx[t][:, t].mean() + ryy[t][:, t].mean() - 2 * rxy[t][:, t].mean())

            j.put("cmmd", M.cmmd(tc, sc), n, ci(cmmd_of) if n <= M.BOOTSTRAP_MAX_IMAGES else None)
            if n < tc.shape[1]:
                j.notes.append(f"fd_clip rests on {n} images, fewer than its {tc.shape[1]} feature dimensions: the "
                               "covariances are singular and the value is biased (upward); compare it only at equal "
                               "image counts, or read cmmd, which has no such bias")
        if text is not None:
            tx = text.double()
            s_score = torch.nn.functional.cosine_similarity(sc, tx, dim=-1)
            t_score = torch.nn.functional.cosine_similarity(tc, tx, dim=-1)
            j.put("clip_score", _mean(s_score), n, M.mean_ci(s_score, seed=seed) if intervals else None)
            j.put("clip_score_teacher", _mean(t_score), n, M.mean_ci(t_score, seed=seed) if intervals else None)
            if abs(_mean(t_score)) > 1e-12:
                ratio_ci = None
                if intervals and n >= 3:
                    ratio_ci = M.resample_ci(n, lambda i: float(s_score[i].mean() / t_score[i].mean()), seed=seed)
                j.put("clip_score_ratio", _mean(s_score) / _mean(t_score), n, ratio_ci)
        elif text_note:
            j.notes.append(f"clip_score left out: {text_note}")
    else:
        j.notes.append("clip_image_cosine, fd_clip, kid_clip, cmmd and clip_score left out: no CLIP vision model "
                       "connected (connect Load CLIP Vision: ViT-L/14, ViT-H/14 or ViT-bigG/14)")
    if teacher.pool is not None and student.pool is not None:
        tp, sp = teacher.pool.double(), student.pool.double()
        if distribution and n >= 2:
            j.put("fid", M.frechet_distance(tp, sp), n, ci(lambda i: M.frechet_fast(tp[i], sp[i])))
            kmean, kstd = M.kid(tp, sp, seed=seed)
            j.put("kid", kmean, n)
            j.metrics["kid_std"] = kstd
            if n < tp.shape[1]:
                j.notes.append(f"fid and kid rest on {n} images, fewer than the 2048 Inception features: FID is "
                               "biased (upward) there and only comparable at equal image counts (the papers use 30K)")
        if reference_stats is not None and n >= 2:
            mu, sigma = reference_stats
            j.put("fid_stats", M.frechet_distance_to_stats(mu, sigma, sp), n)
            j.put("fid_stats_teacher", M.frechet_distance_to_stats(mu, sigma, tp), n)
            j.notes.append("fid_stats is comparable with the papers' FID only at their protocol: 30K COCO captions, "
                           "512 px images resized to 256 px (tools/evaluate.py --fid-size 256), statistics of the "
                           "256 px val2014 images")
        if teacher.logits is not None and student.logits is not None and n >= 2:
            j.put("inception_score", M.inception_score(student.logits)[0], n)
            j.put("inception_score_teacher", M.inception_score(teacher.logits)[0], n)
    else:
        j.notes.append("fid, kid and inception_score left out: no Inception file given (put pytorch-fid's "
                       "pt_inception-2015-12-05-6726825d.pth under models/inception)")
    if not distribution and (teacher.clip is not None or teacher.pool is not None):
        j.notes.append("distribution distances left out (fd_clip, kid_clip, cmmd, fid, kid)")
    return j


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf (identical)" if v > 0 else str(v)
    a = abs(v)
    return f"{v:.4f}" if a >= 0.01 or a == 0 else f"{v:.3e}"


def format_report(results: dict[str, Judgement], *, header: list[str] | None = None,
                  footer: list[str] | None = None) -> str:
    """The report as a person reads it: one table per student (metric, value, 95 % interval, images, what it
    says), then what was left out and why."""
    lines = list(header or [])
    for name, j in results.items():
        lines.append("")
        lines.append(f"== {name} vs teacher ==")
        rows = [("metric", "value", "95% CI", "images", "what it says")]
        for k in ORDER:
            if k not in j.metrics:
                continue
            lo_hi = j.ci.get(k)
            ci_s = f"{_fmt(lo_hi[0])} .. {_fmt(lo_hi[1])}" if lo_hi else "-"
            better = "higher" if higher_is_better(k) else "lower"
            rows.append((k, _fmt(j.metrics[k]), ci_s, str(j.counts.get(k, "")), f"{INFO[k]}; {better} is better"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
        for note in j.notes:
            lines.append(f"note: {note}")
    lines += list(footer or [])
    return "\n".join(lines).strip("\n")
