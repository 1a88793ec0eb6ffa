# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: one knowledge-distillation training step of the pack's engine (models/distill.py on ComfyUI's own
UNet) against the same step written directly on diffusers' UNet2DConditionModel (BK-SDM's recipe).

Both sides get the same teacher and student weights (random, in the real structures: SD1.5 teacher and
BK-SDM-Small student, or SDXL teacher and SSD-1B student), the same samples, timesteps and noise (the pack's
``draw_batch``), and do the same work per step: teacher forward (no grad), student forward, loss = task MSE +
output KD + feature KD over BK-SDM's 8 stage outputs, backward, grad-norm clip 1, AdamW (lr 5e-5, weight decay
1e-2), EMA (diffusers' EMAModel on the diffusers side, as BK-SDM). The diffusers side uses its default SDPA
attention; the pack runs with its SDPA override (``pack``) and with ComfyUI's own attention backend
(``pack-host``: the sub-quadratic one on CPU) to show why the override exists.

Reported per variant: best and median s/step after warm-up (ratios on the best: the least disturbed
measurement on a shared machine), peak memory (CUDA: ``torch.cuda.max_memory_allocated``
over the run; CPU: peak RSS over the steps minus the RSS before them, sampled every millisecond, each
variant in a fresh process), the ratios pack / diffusers, and how far the two implementations' losses are
apart (same weights and draws: they compute the same thing).

    python bench/bench_distill.py                          # CPU, fp32, reduced width (channels / 10)
    BENCH_DEVICE=cuda python bench/bench_distill.py --width full --size 64 --batch 1,2,4,8
    BENCH_DEVICE=cuda python bench/bench_distill.py --preset sdxl-ssd1b --width full --size 128 --batch 1,2

CPU memory caveat: the pack trains a copy of the student while the input MODEL stays in RAM (ComfyUI holds
it), so its CPU figure includes one extra set of student weights (printed); on a GPU the input stays on
the CPU and only the trained copy is on the device, as diffusers' trained model is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

from _pack import ROOT, import_pack, setup_comfy  # noqa: E402

PRESETS = {"bk-small": ("sd1", None, "nota-ai/bk-sdm-small"), "sdxl-ssd1b": ("sdxl", None, "segmind/SSD-1B")}
IMPLS = ("pack", "pack-host", "diffusers")


def _setup(device: str):
    os.environ.setdefault("BENCH_DEVICE", device)
    setup_comfy()
    import_pack()
    sys.path.insert(0, str(ROOT))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _RSSPeak:
    """Peak RSS over a window, sampled by a thread every millisecond."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _configs(a):
    from distilled_unets.models import structures as S
    from distilled_unets.models.registry import by_id
    from distilled_unets.models.topology import diffusers_config

    from tests.layouts import tiny_config

    family, _, student_id = PRESETS[a.preset]
    t_cfg, s_cfg = diffusers_config(S.TEACHERS[family]), diffusers_config(by_id(student_id).structure)
    if a.width == "tiny":
        t_cfg, s_cfg = tiny_config(t_cfg), tiny_config(s_cfg)
    return family, t_cfg, s_cfg


def _structure(dm):
    """(Topology, ldm state dict) of a diffusers UNet, through the pack's own detection."""
    from distilled_unets.models.detect import detect

    sd = dm.state_dict()
    det = detect({k: tuple(v.shape) for k, v in sd.items()})
    n = len(det.prefix)
    return det.topology, {det.key_map[k[n:]]: v for k, v in sd.items()
                          if k.startswith(det.prefix) and k[n:] in det.key_map}


def run_variant(a, impl: str, ckpt: bool, batch: int) -> dict:
    """One variant in this process: build, train warm-up + measured steps, return times, peak and losses."""
    import torch

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import comfy.model_management as mm
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from distilled_unets.models import distill as D
    from distilled_unets.nodes._glue import build_model

    from tests.layouts import diffusers_model

    dev = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    cuda = dev.type == "cuda"
    family, t_cfg, s_cfg = _configs(a)
    steps = a.warmup + a.steps
    n = batch * steps
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(n, 4, a.size, a.size, generator=g)
    ctx = torch.randn(n, 77, t_cfg["cross_attention_dim"], generator=g)
    teacher_d = diffusers_model(t_cfg, seed=1)
    student_d = diffusers_model(s_cfg, seed=2)
    added = None
    y = None
    if family == "sdxl":
        pooled = torch.randn(n, 1280, generator=g)
        time_ids = torch.tensor([[a.size * 8, a.size * 8, 0, 0, a.size * 8, a.size * 8]] * n, dtype=torch.float32)
        with torch.no_grad():
            y = torch.cat([pooled, student_d.add_time_proj(time_ids.flatten()).reshape(n, -1)], dim=1)
        added = (pooled, time_ids)
    precision = "bf16" if cuda else "fp32"
    amp = torch.bfloat16 if cuda else None
    seed = 7
    t_labels = []
    out: dict = {"impl": impl, "ckpt": ckpt, "batch": batch}
    if impl.startswith("pack"):
        tt, sd_t = _structure(teacher_d)
        st, sd_s = _structure(student_d)
        teacher = build_model(tt, sd_t, weight_dtype="bf16" if cuda else "fp32")
        student = build_model(st, sd_s, weight_dtype="fp32")
        del teacher_d, student_d, sd_t, sd_s
        if cuda:
            mm.load_models_gpu([teacher])
        data = D.KDData(lat, ctx, y)
        cfg = D.DistillConfig(steps=steps, batch_size=batch, learning_rate=5e-5, ema_decay=0.9999, seed=seed,
                              gradient_checkpointing=ckpt, precision=precision,
                              attention="host" if impl == "pack-host" else "sdpa")
        d = D.Distiller(teacher=teacher.model.diffusion_model, student=student.model.diffusion_model,
                        teacher_topology=tt, student_topology=st,
                        schedule=D.NoiseSchedule(teacher.model.model_sampling, prediction="eps"), data=data,
                        config=cfg, device=dev)
        out["estimate"] = d.estimate_memory(teacher_resident=cuda).total
        out["student_weight_bytes"] = sum(p.numel() * 4 for p in student.model.diffusion_model.parameters())
        stamps = []

        def progress(step, total, loss):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with _RSSPeak() as rss:
            t0 = time.perf_counter()
            res = d.run(progress=progress)
        times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]
        losses = res.losses
        t_labels = [p.label for p in d.plan.points]
    else:
        from distilled_unets.models.distill import feature_plan

        tt, st = _structure(teacher_d)[0], _structure(student_d)[0]
        t_labels = [p.label for p in feature_plan(tt, st).points]
        if any("↔" in lbl or "proj_out" in lbl for lbl in t_labels):
            raise SystemExit("this preset needs a non-stage feature pairing; the diffusers side does stages only")
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
        teacher = teacher_d.to(dev, torch.bfloat16 if cuda else torch.float32).requires_grad_(False)
        student = student_d.to(dev)
        student.train()
        if ckpt:
            student.enable_gradient_checkpointing()
        acts_t, acts_s = {}, {}

        def hook(mem, name):
            def fn(module, inp, output):
                mem[name] = output
            return fn

        for lbl in t_labels:
            teacher.get_submodule(lbl).register_forward_hook(hook(acts_t, lbl))
            student.get_submodule(lbl).register_forward_hook(hook(acts_s, lbl))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times, losses = [], []
        with _RSSPeak() as rss:
            opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
            ema = EMAModel(student.parameters(), decay=0.9999)
            for step in range(steps):
                t0 = time.perf_counter()
                idx, t, noise = D.draw_batch(seed, step, 0, n_data=n, batch_size=batch, grad_accum=1,
                                             num_timesteps=1000, sample_shape=tuple(lat.shape[1:]))
                x0, c, noise, t = lat[idx].to(dev), ctx[idx].to(dev), noise.to(dev), t.to(dev)
                noisy = sched.add_noise(x0, noise, t)
                kw_s, kw_t = {}, {}
                if added is not None:
                    kw_s = {"added_cond_kwargs": {"text_embeds": added[0][idx].to(dev),
                                                  "time_ids": added[1][idx].to(dev)}}
                    kw_t = {"added_cond_kwargs": {k: v.to(teacher.dtype) for k, v in kw_s["added_cond_kwargs"].items()}}
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    pred = student(noisy, t, c, **kw_s).sample
                    with torch.no_grad():
                        pred_t = teacher(noisy.to(teacher.dtype), t, c.to(teacher.dtype), **kw_t).sample
                loss_sd = torch.nn.functional.mse_loss(pred.float(), noise.float())
                loss_out = torch.nn.functional.mse_loss(pred.float(), pred_t.float())
                feats = []
                for lbl in t_labels:
                    a_t, a_s = acts_t[lbl], acts_s[lbl]
                    a_t = a_t[0] if isinstance(a_t, tuple) else a_t
                    a_s = a_s[0] if isinstance(a_s, tuple) else a_s
                    feats.append(torch.nn.functional.mse_loss(a_s.float(), a_t.detach().float()))
                loss = loss_sd + loss_out + sum(feats)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                ema.step(student.parameters())
                losses.append(float(loss.detach()))
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    out["times"] = times[a.warmup:]
    out["losses"] = losses
    out["labels"] = t_labels
    if cuda:
        out["peak"] = torch.cuda.max_memory_allocated()
        out["base"] = base
    else:
        out["peak"] = rss.peak - rss.base
    return out


def _worker_cmd(a, impl, ckpt, batch):
    return [sys.executable, __file__, "--worker", f"{impl},{int(ckpt)},{batch}", "--preset", a.preset,
            "--width", a.width, "--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--threads", str(a.threads)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bk-small", choices=sorted(PRESETS))
    ap.add_argument("--width", default=None, choices=["tiny", "full"],
                    help="tiny: channels / 10 (default on CPU); full: the real widths (default on CUDA)")
    ap.add_argument("--size", type=int, default=None, help="latent side (CPU default 32 = 256 px, CUDA 64)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (CPU default 2, CUDA 1,2,4,8)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="rounds over all variants (interleaved)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    device = os.environ.get("BENCH_DEVICE", "cpu")
    cuda = device == "cuda"
    a.width = a.width or ("full" if cuda else "tiny")
    a.size = a.size or (64 if cuda else 32)
    _setup(device)
    if a.worker:
        impl, ckpt, batch = a.worker.split(",")
        print("RESULT " + json.dumps(run_variant(a, impl, bool(int(ckpt)), int(batch))))
        return 0
    batches = [int(b) for b in (a.batch or ("1,2,4,8" if cuda else "2")).split(",")]
    impls = a.impls.split(",")
    ckpts = [c == "on" for c in a.checkpointing.split(",")]
    variants = [(i, c, b) for b in batches for c in ckpts for i in impls]
    results: dict = {v: [] for v in variants}
    for _ in range(a.reps):
        for v in variants:
            if cuda:  # one GPU: in this process, peak stats reset per variant
                import gc

                import torch

                results[v].append(run_variant(a, *v))
                gc.collect()
                torch.cuda.empty_cache()
            else:
                p = subprocess.run(_worker_cmd(a, *v), capture_output=True, text=True, cwd=str(ROOT))
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"worker {v} failed")
                results[v].append(json.loads(line[0][len("RESULT "):]))
    gib = 1024 ** 3
    print(f"KD step, preset {a.preset} ({a.width} width), latent {a.size}x{a.size}, device {device}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, threads {a.threads}, {a.steps} steps x {a.reps} rounds, "
          f"feature points: {', '.join(results[variants[0]][0]['labels'])}")
    print(f"{'batch':>5} {'ckpt':>4} {'impl':>10} {'best s/step':>12} {'median':>8} {'peak MiB':>9} "
          f"{'time vs diffusers':>18} {'memory':>7} {'max rel loss diff':>18}")
    for b in batches:
        for c in ckpts:
            ref = results.get(("diffusers", c, b))
            ref_t = min(x for r in ref for x in r["times"]) if ref else None
            ref_m = statistics.median([r["peak"] for r in ref]) if ref else None
            for i in impls:
                rs = results[(i, c, b)]
                times = [x for r in rs for x in r["times"]]
                t, med = min(times), statistics.median(times)
                m = statistics.median([r["peak"] for r in rs])
                diff = ""
                if ref and i != "diffusers":
                    la, lb = rs[0]["losses"], ref[0]["losses"]
                    diff = f"{max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb)):.2e}"
                ratio_t = f"{t / ref_t:.3f}" if ref_t else ""
                ratio_m = f"{m / ref_m:.3f}" if ref_m else ""
                print(f"{b:>5} {'on' if c else 'off':>4} {i:>10} {t:>12.4f} {med:>8.4f} {m / 2**20:>9.1f} "
                      f"{ratio_t:>18} {ratio_m:>7} {diff:>18}")
            if ("pack", c, b) in results:
                e = results[("pack", c, b)][0]
                note = f"; input student weights {e['student_weight_bytes'] / 2**20:.1f} MiB" if not cuda else ""
                print(f"{'':>16} pack's up-front estimate {e['estimate'] / gib:.3f} GiB{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
