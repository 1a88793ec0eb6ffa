# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: one knowledge-distillation training step of the pack's engine (``distilled_unets.models.students.distill`` on
ComfyUI's own UNet) against the same step written directly on diffusers' UNet2DConditionModel (BK-SDM's recipe).

Both sides get the same teacher and student weights (random, in the real structures: SD1.5 teacher and
BK-SDM-Small student, or the SDXL teacher and a Segmind-Vega / KOALA-700M / SSD-1B student), the same
samples, timesteps and noise (the engine's ``draw_batch``), and do the same work per step: teacher forward
(no grad), student forward, loss = task MSE + output KD + feature KD over BK-SDM's stage outputs, backward,
grad-norm clip 1, AdamW (lr 5e-5, weight decay 1e-2), EMA (diffusers' EMAModel on the diffusers side, as
BK-SDM). The diffusers side uses its default SDPA attention; the pack runs with its SDPA override (``pack``),
with its memory options (``pack-lowmem``: selective recompute where checkpointing is off, the EMA on the host
where the device is a GPU; neither changes the loss or the weights) and, on the CPU, with ComfyUI's own attention
backend (``pack-host``: the sub-quadratic one) to show why the override exists.

Where the models live: every UNet is built once per process per preset, directly on the device and drawn
there (``tests/layouts.diffusers_model`` under ``torch.device``; the pack's UNets are ComfyUI's own, built on
the device from the same tensors). On a GPU every variant runs in this one process: the pack copies its
student itself (the input stays unchanged), the diffusers student is trained in place and reset from a saved
device copy before each variant. On the CPU each variant runs in a fresh process (the peak resident set
cannot be measured otherwise) that builds its own tiny-width models. Only the data (latents, text
conditioning, timesteps, noise) crosses from the host, as in the node.

Reported per variant: median ms per step after warm-up (three significant figures) with its spread
((median - best) / best; a variant above 5 % gets more rounds, up to ``--max-reps``), samples/s, the model
FLOP utilisation (MFU: samples/s x the pack's cost model ``models/structure/cost.py`` per sample, teacher forward +
3x student forward, over the card's bf16 dense peak; CUDA cards of the table in ``_device.peak_tflops``
only), the peak memory the step needs above the resident teacher (the bytes of live tensors: CUDA
``torch.cuda.max_memory_allocated``; CPU the same count from the profiler's allocation events, in a second pass
of ``--warmup`` + 1 steps so that the timed pass runs without the profiler; the diffusers side counts the student
weights it trains in place, as the pack counts its trainable copy), on the CPU also the peak RSS of the timed pass
(which holds the allocator's cached and fragmented pages too), the ratios pack / diffusers, the engine's
up-front estimate over the measured peak (goal within +-15 %), and how far the two sides' losses are apart
(same weights and draws).

    python bench/bench_distill.py                          # CPU, fp32, reduced width (channels / 10)
    BENCH_DEVICE=cuda python bench/bench_distill.py --preset bk-small,vega   # full width, 512 px and 1024 px
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import _device
from _pack import ROOT, import_pack, setup_comfy  # noqa: E402

# preset -> (teacher family, registry id of the student)
PRESETS = {"bk-small": ("sd1", "nota-ai/bk-sdm-small"), "vega": ("sdxl", "segmind/Segmind-Vega"),
           "koala-700m": ("sdxl", "etri-vilab/koala-700m"), "sdxl-ssd1b": ("sdxl", "segmind/SSD-1B")}
IMPLS = ("pack", "pack-lowmem", "pack-host", "diffusers")
GOALS = "goals: time <= 1.00x diffusers, peak memory <= 0.80x, estimate/peak within 0.85-1.15, bk-small at " \
        "512 px >= 60 samples/s on one H100"


def _setup(device: str):
    os.environ.setdefault("BENCH_DEVICE", device)
    setup_comfy()
    import_pack()
    sys.path.insert(0, str(ROOT))


def _structure(dm):
    """(Topology, ldm state dict) of a diffusers UNet, through the pack's own detection (the tensors are
    the model's own)."""
    from distilled_unets.models.structure.detect import detect

    sd = dm.state_dict()
    det = detect({k: tuple(v.shape) for k, v in sd.items()})
    n = len(det.prefix)
    return det.topology, {det.key_map[k[n:]]: v for k, v in sd.items()
                          if k.startswith(det.prefix) and k[n:] in det.key_map}


def _comfy_unet(topology, sd: dict, dtype, device):
    """ComfyUI's own UNet (and its BaseModel, for the noise schedule) of ``topology`` built on ``device``
    and holding a copy of ``sd`` (ldm names) in ``dtype``: a device-to-device copy."""
    import torch
    from distilled_unets.nodes.host.unet import comfy_model

    model = comfy_model(topology, dtype, None, device=device)
    with torch.no_grad():
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's UNet of {topology.describe()} does not take the converted weights: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.diffusion_model.requires_grad_(False)
    return model


class Models:
    """Everything a preset's variants share, built once: both sides' teacher and student on the device,
    the data on the host."""

    def __init__(self, a, preset: str, dev, max_batch: int):
        import torch
        from distilled_unets.models.structure import structures as S
        from distilled_unets.models.structure.registry import by_id
        from distilled_unets.models.structure.topology import diffusers_config
        from distilled_unets.models.students import distill as D

        from tests.layouts import diffusers_model, tiny_config

        self.preset, self.dev, self.cuda = preset, dev, dev.type == "cuda"
        self.family, student_id = PRESETS[preset]
        t_cfg, s_cfg = diffusers_config(S.TEACHERS[self.family]), diffusers_config(by_id(student_id).structure)
        if a.width == "tiny":
            t_cfg, s_cfg = tiny_config(t_cfg), tiny_config(s_cfg)
        self.t_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.precision = "bf16" if self.cuda else "fp32"
        self.amp = torch.bfloat16 if self.cuda else None
        # diffusers' side, constructed and drawn on the device
        self.teacher_d = diffusers_model(t_cfg, device=dev, seed=1).to(self.t_dtype).requires_grad_(False)
        self.student_d = diffusers_model(s_cfg, device=dev, seed=2)
        with torch.no_grad():
            self.student_init = {k: v.detach().clone() for k, v in self.student_d.state_dict().items()}
        self.student_bytes = sum(p.numel() * p.element_size() for p in self.student_d.parameters())
        # the pack's side: ComfyUI's UNets of the detected structures, copies of the same tensors
        self.tt, sd_t = _structure(self.teacher_d)
        self.st, sd_s = _structure(self.student_d)
        teacher = _comfy_unet(self.tt, sd_t, self.t_dtype, dev)
        self.pack_teacher = teacher.diffusion_model
        self.pack_student = _comfy_unet(self.st, sd_s, torch.float32, dev).diffusion_model
        self.schedule = D.NoiseSchedule(teacher.model_sampling.to(dev), prediction="eps")  # on the device, as loaded
        del sd_t, sd_s
        self.labels = [p.label for p in D.feature_plan(self.tt, self.st).points]
        # the data: host tensors, as the node's encoded latents and conditioning are
        self.n = max_batch * (a.warmup + a.steps)
        g = torch.Generator().manual_seed(0)
        self.lat = torch.randn(self.n, 4, a.size, a.size, generator=g)
        self.ctx = torch.randn(self.n, 77, t_cfg["cross_attention_dim"], generator=g)
        self.added, y = None, None
        if self.family == "sdxl":
            pooled = torch.randn(self.n, 1280, generator=g)
            px = a.size * 8
            time_ids = torch.tensor([[px, px, 0, 0, px, px]] * self.n, dtype=torch.float32)
            with torch.no_grad():
                proj = self.student_d.add_time_proj(time_ids.flatten().to(dev)).reshape(self.n, -1).cpu()
            y = torch.cat([pooled, proj.float()], dim=1)
            self.added = (pooled, time_ids)
        self.data = D.KDData(self.lat, self.ctx, y)

    def free(self):
        for k in list(vars(self)):
            delattr(self, k)
        gc.collect()


def run_variant(a, m: Models, impl: str, ckpt: bool, batch: int, *, alloc: bool = False) -> dict:
    """One variant on the shared models: warm-up + measured steps; times, peak, losses, estimate. ``alloc``: a
    pass of warm-up + 1 steps whose peak is the live tensor bytes (on the CPU through the profiler: no times)."""
    import torch
    from distilled_unets.models.students import distill as D

    dev, cuda = m.dev, m.cuda
    steps = a.warmup + (1 if alloc else a.steps)
    seed = 7
    out: dict = {"impl": impl, "ckpt": ckpt, "batch": batch}
    Peak = _device.PeakAllocated if alloc else _device.PeakMemory
    if impl.startswith("pack"):
        low = impl == "pack-lowmem"
        cfg = D.DistillConfig(steps=steps, batch_size=batch, learning_rate=5e-5, ema_decay=0.9999, seed=seed,
                              gradient_checkpointing=ckpt, precision=m.precision,
                              attention="host" if impl == "pack-host" else "sdpa",
                              selective_recompute=low and not ckpt, ema_on_host=low)
        d = D.Distiller(teacher=m.pack_teacher, student=m.pack_student, teacher_topology=m.tt,
                        student_topology=m.st, schedule=m.schedule, data=m.data, config=cfg, device=dev,
                        teacher_dtype=m.t_dtype)
        t_est = time.perf_counter()
        out["estimate"] = d.estimate_memory(teacher_resident=True).total
        out["estimate_s"] = time.perf_counter() - t_est
        stamps = []

        def progress(step, total, loss):
            _device.sync(dev)
            stamps.append(time.perf_counter())

        with Peak(dev) as pm:
            _device.sync(dev)
            t0 = time.perf_counter()
            res = d.run(progress=progress)
        out["peak"] = pm.mib * 2 ** 20
        times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]
        losses = res.losses
        del d, res
    else:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        if any("↔" in lbl or "proj_out" in lbl for lbl in m.labels):
            raise SystemExit("this preset needs a non-stage feature pairing; the diffusers side does stages only")
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
        teacher, student = m.teacher_d, m.student_d
        with torch.no_grad():  # the same initial weights as every other variant
            for k, v in student.state_dict().items():
                v.copy_(m.student_init[k])
        student.train()
        if ckpt:
            student.enable_gradient_checkpointing()
        acts_t, acts_s = {}, {}

        def hook(mem, name):
            def fn(module, inp, output):
                mem[name] = output
            return fn

        handles = [teacher.get_submodule(lbl).register_forward_hook(hook(acts_t, lbl)) for lbl in m.labels]
        handles += [student.get_submodule(lbl).register_forward_hook(hook(acts_s, lbl)) for lbl in m.labels]
        times, losses = [], []
        lat, ctx = m.lat, m.ctx
        try:
            with Peak(dev) as pm:
                opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2,
                                        eps=1e-8)
                ema = EMAModel(student.parameters(), decay=0.9999)
                for step in range(steps):
                    _device.sync(dev)
                    t0 = time.perf_counter()
                    idx, t, noise = D.draw_batch(seed, step, 0, n_data=m.n, batch_size=batch, grad_accum=1,
                                                 num_timesteps=1000, sample_shape=tuple(lat.shape[1:]))
                    x0, c, noise, t = lat[idx].to(dev), ctx[idx].to(dev), noise.to(dev), t.to(dev)
                    noisy = sched.add_noise(x0, noise, t)
                    kw_s, kw_t = {}, {}
                    if m.added is not None:
                        kw_s = {"added_cond_kwargs": {"text_embeds": m.added[0][idx].to(dev),
                                                      "time_ids": m.added[1][idx].to(dev)}}
                        kw_t = {"added_cond_kwargs": {k: v.to(teacher.dtype)
                                                      for k, v in kw_s["added_cond_kwargs"].items()}}
                    with torch.autocast(dev.type, dtype=m.amp, enabled=m.amp is not None):
                        pred = student(noisy, t, c, **kw_s).sample
                        with torch.no_grad():
                            pred_t = teacher(noisy.to(teacher.dtype), t, c.to(teacher.dtype), **kw_t).sample
                    loss_sd = torch.nn.functional.mse_loss(pred.float(), noise.float())
                    loss_out = torch.nn.functional.mse_loss(pred.float(), pred_t.float())
                    feats = []
                    for lbl in m.labels:
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
                    acts_t.clear()
                    acts_s.clear()
                    _device.sync(dev)
                    times.append(time.perf_counter() - t0)
            # the trained model's weights are resident before the clock: count them, as the pack's copy is
            out["peak"] = pm.mib * 2 ** 20 + m.student_bytes
        finally:
            for h in handles:
                h.remove()
            if ckpt:
                student.disable_gradient_checkpointing()
            student.eval()
            student.zero_grad(set_to_none=True)
            opt = ema = None
    out["times"] = times[a.warmup:]
    out["first"] = times[0]  # the first step: the run's own setup (trainable copy, optimizer) and first calls
    out["losses"] = losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _worker_cmd(a, preset, impl, ckpt, batch):
    return [sys.executable, __file__, "--worker", f"{preset},{impl},{int(ckpt)},{batch}", "--width", a.width,
            "--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]


def with_allocated(a, m: Models, impl: str, ckpt: bool, batch: int) -> dict:
    """A variant timed (peak RSS on the CPU), then on the CPU its live-tensor peak in a second, profiled pass."""
    r = run_variant(a, m, impl, ckpt, batch)
    if not m.cuda:
        r["rss"] = r["peak"]
        alloc = run_variant(a, m, impl, ckpt, batch, alloc=True)
        r["peak"] = alloc["peak"]
        r["alloc_losses"] = alloc["losses"]
    return r


def _run_worker(a, preset, impl, ckpt, batch) -> dict:
    """One CPU variant in a fresh process (its own peak RSS); its setup and measuring seconds come back."""
    t0 = time.perf_counter()
    p = subprocess.run(_worker_cmd(a, preset, impl, ckpt, batch), capture_output=True, text=True, cwd=str(ROOT))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"worker {preset} {impl} ckpt={ckpt} batch={batch} failed")
    r = json.loads(line[0][len("RESULT "):])
    r["wall"] = time.perf_counter() - t0
    return r


def _tflop_per_sample(m: Models, size: int) -> float:
    """One sample of a KD step in FLOP, by the pack's cost model: teacher forward + student forward and backward
    (about 3x its forward), 2 FLOP per multiply-accumulate."""
    from distilled_unets.models.structure.cost import unet_cost

    return 2 * (unet_cost(m.tt, size, size).macs + 3 * unet_cost(m.st, size, size).macs) / 1e12


def _table(a, preset, m: Models, results: dict, variants, device_name, peak_tf):
    flop = _tflop_per_sample(m, a.size)
    from distilled_unets.models.structure.cost import unet_cost

    print(f"\nKD step, preset {preset} ({a.width} width): {m.family} teacher "
          f"({unet_cost(m.tt).params / 1e6:.0f}M parameters), student {unet_cost(m.st).params / 1e6:.0f}M; "
          f"{a.size * 8} px (latent {a.size}x{a.size}); {device_name}; "
          f"{'bf16 autocast, teacher bf16' if m.cuda else 'fp32'}; {a.steps} steps after {a.warmup} warm-up, "
          f"{a.reps}-{a.max_reps} rounds per variant (more while spread > {_device.SPREAD_GOAL:.0%})")
    print(f"feature points: {', '.join(m.labels)}; cost model {flop:.3g} TFLOP per sample"
          + (f", device peak {peak_tf:g} TFLOP/s bf16 dense" if peak_tf else ", MFU not printed (device peak "
             "unknown)"))
    print("peak = memory the step needs above the resident teacher and inputs, the bytes of live tensors "
          + ("(torch.cuda.max_memory_allocated)" if m.cuda else "(the profiler's CPU allocation events, a pass of "
             f"{a.warmup} + 1 steps apart from the timed one); RSS = peak resident set of the timed pass "
             + ("(each variant in a fresh process)" if not a.in_process else "(indicative: one process)")))
    rss_head = f" {'RSS MiB':>8}" if not m.cuda else ""
    print(f"{'batch':>5} {'ckpt':>4} {'impl':>11} {'1st step':>8} {'ms/step':>8} {'best':>8} {'spread':>6} "
          f"{'rounds':>6} {'samples/s':>9} {'MFU':>6} {'peak MiB':>9}{rss_head} {'time vs diff.':>13} "
          f"{'memory vs diff.':>15} {'estimate/peak':>13} {'loss diff':>9}")
    batches = sorted({v[2] for v in variants})
    for b in batches:
        for c in sorted({v[1] for v in variants}):
            ref = [r for r in results.get(("diffusers", c, b), []) if "error" not in r]
            ref_t = statistics.median([x for r in ref for x in r["times"]]) if ref else None
            ref_m = max(r["peak"] for r in ref) if ref else None
            for i in [v[0] for v in variants if v[1] == c and v[2] == b]:
                rs = [r for r in results[(i, c, b)] if "error" not in r]
                if not rs:
                    print(f"{b:>5} {'on' if c else 'off':>4} {i:>11} {results[(i, c, b)][0]['error']}")
                    continue
                times = [x for r in rs for x in r["times"]]
                med, best = statistics.median(times), min(times)
                mem = max(r["peak"] for r in rs)
                sps = b / med
                mfu = f"{sps * flop / peak_tf:.1%}" if peak_tf else "-"
                diff = ""
                if ref and i != "diffusers":
                    la, lb = rs[0]["losses"], ref[0]["losses"]
                    diff = f"{max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb)):.1e}"
                est = f"{rs[0]['estimate'] / mem:.3f}" if "estimate" in rs[0] and mem > 0 else ""
                first = _device.ms3(min(r["first"] for r in rs))
                rss = f" {max(r['rss'] for r in rs) / 2 ** 20:>8.0f}" if not m.cuda else ""
                print(f"{b:>5} {'on' if c else 'off':>4} {i:>11} {first:>8} {_device.ms3(med):>8} "
                      f"{_device.ms3(best):>8} {_device.spread(times):>6.1%} {len(rs):>6} {sps:>9.3g} {mfu:>6} "
                      f"{mem / 2 ** 20:>9.1f}{rss} "
                      f"{(f'{med / ref_t:.3f}' if ref_t else ''):>13} {(f'{mem / ref_m:.3f}' if ref_m else ''):>15} "
                      f"{est:>13} {diff:>9}")
    for b in batches:
        for c in sorted({v[1] for v in variants}):
            pair = [results.get((i, c, b), []) for i in ("pack", "pack-lowmem")]
            if all(p and "error" not in p[0] for p in pair):
                same = pair[0][0]["losses"] == pair[1][0]["losses"]
                print(f"batch {b}, checkpointing {'on' if c else 'off'}: pack-lowmem's losses "
                      f"{'equal' if same else 'DIFFER from'} pack's bit for bit ({len(pair[0][0]['losses'])} steps)")
    ests = [r["estimate_s"] for v in variants for r in results[v] if "estimate_s" in r]
    if ests:
        print(f"before its first step each pack run spends {statistics.median(ests):.2f} s in the engine's memory "
              "estimate (a pass on the meta device); '1st step' (ms, best of the rounds) holds the run's own setup: "
              "the trainable copy, the optimizer, the first kernels")
    print(GOALS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help=f"comma-separated, of {', '.join(PRESETS)} "
                    "(default: bk-small,vega on CUDA, bk-small on the CPU)")
    ap.add_argument("--width", default=None, choices=["tiny", "full"],
                    help="tiny: channels / 10 (default on CPU); full: the real widths (default on CUDA)")
    ap.add_argument("--size", type=int, default=None,
                    help="latent side (default: CUDA 64 = 512 px for SD, 128 = 1024 px for SDXL; CPU 32 / 16)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes for SD presets (CUDA 1,4,8; CPU 2)")
    ap.add_argument("--sdxl-batch", default=None, help="batch sizes for SDXL presets (CUDA 1,2; CPU 2)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the clock, every round")
    ap.add_argument("--reps", type=int, default=1, help="rounds over all variants (interleaved)")
    ap.add_argument("--max-reps", type=int, default=0, help="bound on the rounds of a variant whose spread is "
                    "above 5 %% (default --reps + 2)")
    ap.add_argument("--impls", default=None, help="default: pack,pack-lowmem,diffusers on CUDA; "
                    "pack,pack-lowmem,pack-host,diffusers on CPU")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing for SD presets")
    ap.add_argument("--sdxl-checkpointing", default=None, help="for SDXL presets (default: as --checkpointing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true",
                    help="on the CPU too, every variant in this process on models built once, as on a GPU (the CPU "
                         "peak is then only indicative: freed memory stays with the process)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    ph = _device.Phases()
    device = os.environ.get("BENCH_DEVICE", "cpu")
    cuda = device.startswith("cuda")
    a.width = a.width or ("full" if cuda else "tiny")
    a.max_reps = max(a.max_reps or a.reps + 2, a.reps)
    _setup(device)
    import torch

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    dev = torch.device(device)
    if a.worker:  # one CPU variant: build, run, report
        preset, impl, ckpt, batch = a.worker.split(",")
        a.size = a.size or (16 if PRESETS[preset][0] == "sdxl" else 32)
        m = Models(a, preset, dev, int(batch))
        r = with_allocated(a, m, impl, bool(int(ckpt)), int(batch))
        r.update(labels=m.labels)
        print("RESULT " + json.dumps(r))
        return 0
    presets = (a.preset or ("bk-small,vega" if cuda else "bk-small")).split(",")
    impls = (a.impls or ("pack,pack-lowmem,diffusers" if cuda else ",".join(IMPLS))).split(",")
    peak_tf = _device.peak_tflops(dev) if cuda else None
    device_name = _device.describe(dev, torch.bfloat16 if cuda else torch.float32)
    size_arg = a.size
    for preset in presets:
        sdxl = PRESETS[preset][0] == "sdxl"
        a.size = size_arg or ((128 if sdxl else 64) if cuda else (16 if sdxl else 32))
        batch_arg = a.sdxl_batch if sdxl else a.batch
        batches = [int(b) for b in (batch_arg or (("1,2" if sdxl else "1,4,8") if cuda else "2")).split(",")]
        ckpt_arg = (a.sdxl_checkpointing or a.checkpointing) if sdxl else a.checkpointing
        ckpts = [c == "on" for c in ckpt_arg.split(",")]
        variants = [(i, c, b) for b in batches for c in ckpts for i in impls]
        results: dict = {v: [] for v in variants}
        shared = cuda or a.in_process
        t_build = time.perf_counter()
        m = Models(a, preset, dev, max(batches)) if shared else None
        if shared:
            _device.sync(dev)
            print(f"{preset}: teacher and student built on {dev} (both sides) in {time.perf_counter() - t_build:.1f} s",
                  flush=True)

        def one(v, models=m):
            if shared:
                try:
                    return with_allocated(a, models, *v)
                except torch.OutOfMemoryError as e:  # one variant out of memory must not hide the others
                    gc.collect()
                    torch.cuda.empty_cache()
                    return {"error": f"out of memory ({str(e).splitlines()[0][:80]})"}
            r = _run_worker(a, preset, *v)
            ph.count_as_setup(r["wall"] - sum(r["times"]))  # the worker's imports, build and warm-up
            return r

        def unsteady(v) -> bool:
            times = [x for r in results[v] for x in r.get("times", [])]
            return bool(times) and _device.spread(times) > _device.SPREAD_GOAL

        ph.measuring()
        for _ in range(a.reps):
            for v in variants:
                results[v].append(one(v))
        # a (batch, checkpointing) group with a variant above the spread goal gets another round, up to max_reps
        for _ in range(a.max_reps - a.reps):
            groups = {(c, b) for (i, c, b) in variants if unsteady((i, c, b))}
            if not groups:
                break
            for v in variants:
                if (v[1], v[2]) in groups:
                    results[v].append(one(v))
        ph.setting_up()
        if not shared:  # the table needs the structures: a tiny build here is cheap
            m = Models(a, preset, dev, max(batches))
        _table(a, preset, m, results, variants, device_name, peak_tf)
        m.free()
        del m
        if cuda:
            torch.cuda.empty_cache()
    print(ph.line())
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
