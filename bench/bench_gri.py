# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: GRI attention vs exact attention vs ComfyUI's HyperTile at equal window, side by side.

Part 1, attention only: the self-attention op of the highest-resolution attention level at its real
width (SD1.5 / tiny-sd: 320 ch, 8 heads x 40; SDXL: the 2x-down level, 640 ch, 10 heads x 64), batch 2
(cond + uncond), times the number of such blocks in the UNet (SD1.5 5, tiny-sd 3, SDXL 10):
  exact         full self-attention (ComfyUI's attention_pytorch)
  hypertile     what HyperTile does: q cut into window x window tiles, ComfyUI's backend
  gri           models/gri.py (windows + pooled global keys in one SDPA call)
Exact attention at 2048 px is extrapolated from a slice of the queries (cost is linear in queries;
marked "~"). Peak memory: process RSS above its level before the call, polled every 1 ms (psutil;
tracemalloc does not see torch's allocator). Every attention, exact and HyperTile included, runs
through ComfyUI's ``attention_pytorch`` (torch SDPA, ComfyUI's default on GPUs and with
--use-pytorch-cross-attention); ComfyUI's CPU default, sub-quadratic attention, is 4-7x slower still
for exact attention, which would flatter GRI.

Part 2, whole UNet: one UNet forward (batch 1: one conditioning, no CFG batch) through ComfyUI's
own UNetModel at FULL width with random weights, unpatched / HyperTile node / GRIAttention node.
Models: SD1.5 and tiny-sd topologies; for SDXL the Segmind-Vega topology (a real SDXL student,
level-2 depth 2 instead of 10, so that a step fits on a CPU). Best of --reps.

    ~/venv/bin/python bench/bench_gri.py [--window 16] [--pool 4] [--sizes 512,1024,2048]
        [--unet-sizes 512,1024] [--reps 2] [--threads 1] [--skip-unet]

Device: CUDA in fp16 when a GPU is there (peak memory: torch.cuda.max_memory_allocated; exact attention
is then timed in full at every size), else the CPU in fp32 (bench/_device.py; BENCH_DEVICE / BENCH_DTYPE
override).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import _device
from _pack import ROOT, import_pack, setup_comfy  # noqa: E402

DEVICE, DTYPE = None, None  # set by _setup()


def _setup():
    global DEVICE, DTYPE
    DEVICE, DTYPE = _device.setup()
    setup_comfy()
    import comfy.ldm.modules.attention as attn

    attn.optimized_attention = attn.attention_pytorch  # one kernel for every column (see the docstring)
    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))


# (name, latent downsampling of the top attention level, channels, heads, top-level self-attention blocks)
ATTN_MODELS = [("sd15", 1, 320, 8, 5), ("tiny-sd", 1, 320, 8, 3), ("sdxl", 2, 640, 10, 10)]


def _time(fn, reps):
    best = math.inf
    for _ in range(reps):
        _device.sync(DEVICE)
        t = time.perf_counter()
        fn()
        _device.sync(DEVICE)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_mem(fn) -> float:
    """MiB above the level before the call: torch.cuda.max_memory_allocated on a GPU, else the process RSS
    sampled every 1 ms by a thread (psutil; tracemalloc does not see torch's allocator)."""
    return _device.peak_mib(fn, DEVICE)


def hypertile_attention(q, k, v, heads, h, w, tile, attn):
    """HyperTile's tiling of q (k, v untouched; the backend views them by q's batch), then un-tiling."""
    from einops import rearrange

    nh, nw = max(1, h // tile), max(1, w // tile)
    qt = rearrange(q, "b (nh h nw w) c -> (b nh nw) (h w) c", h=h // nh, w=w // nw, nh=nh, nw=nw)
    out = attn(qt, k, v, heads)
    out = rearrange(out, "(b nh nw) hw c -> b nh nw hw c", nh=nh, nw=nw)
    return rearrange(out, "b nh nw (h w) c -> b (nh h nw w) c", h=h // nh, w=w // nw)


def attention_part(args):
    import comfy.ldm.modules.attention as attn
    import torch
    from distilled_unets.models import gri

    optimized_attention = attn.optimized_attention

    pool = args.pool or None
    print(f"\n## attention only: top self-attention level, batch 2, x blocks per UNet; window {args.window}, "
          f"pool {args.pool or 'auto'}")
    print(f"{'model':8} {'px':>5} {'grid':>8} {'pool':>4} | {'exact s':>9} {'hypertile s':>11} {'gri s':>8} "
          f"{'shifted s':>9} | {'exact/gri':>9} {'ht/gri':>7} | {'MiB exact':>9} {'ht':>6} {'gri':>6}")
    g = torch.Generator().manual_seed(0)
    for name, down, ch, heads, blocks in ATTN_MODELS:
        for px in args.sizes:
            side = px // 8 // down
            L = side * side
            p = gri.auto_pool(side, side, args.window) if pool is None else pool
            q, k, v = (torch.randn(2, L, ch, generator=g).to(DEVICE, DTYPE) for _ in range(3))
            sub = 1
            # exact on a CPU: at most ~1/4 of the 1024-px SD1.5 work, then extrapolate (a GPU runs it all)
            while DEVICE.type == "cpu" and L * L // sub > 128 ** 4 // 4:
                sub *= 2

            def exact(q=q, k=k, v=v, heads=heads, sub=sub):
                return optimized_attention(q[:, : q.shape[1] // sub], k, v, heads)

            def ht(q=q, k=k, v=v, heads=heads, side=side):
                return hypertile_attention(q, k, v, heads, side, side, args.window, optimized_attention)

            def fast(q=q, k=k, v=v, heads=heads, side=side, p=p):
                return gri.gri_attention(q, k, v, heads, side, side, window=args.window, pool=p)

            def shifted(q=q, k=k, v=v, heads=heads, side=side, p=p):
                return gri.gri_attention(q, k, v, heads, side, side, window=args.window, pool=p,
                                         shift=args.window // 2)

            fast()
            t_gri = _time(fast, args.reps) * blocks
            t_sh = _time(shifted, args.reps) * blocks
            t_ht = _time(ht, args.reps) * blocks
            t_ex = _time(exact, 1 if sub > 1 else args.reps) * blocks * sub
            m_ex = _peak_mem(exact) if sub == 1 else float("nan")
            m_ht, m_gri = _peak_mem(ht), _peak_mem(fast)
            mark = "~" if sub > 1 else " "
            print(f"{name:8} {px:5d} {side:>3}x{side:<4} {p:4d} | {mark}{t_ex:8.2f} {t_ht:11.2f} {t_gri:8.2f} "
                  f"{t_sh:9.2f} | "
                  f"{t_ex / t_gri:8.2f}x {t_ht / t_gri:6.2f}x | {m_ex:9.0f} {m_ht:6.0f} {m_gri:6.0f}", flush=True)


def _unet(name):
    import _tiny_models as tm
    from distilled_unets.models import registry

    vega = registry.by_id("segmind/Segmind-Vega").structure  # a real SDXL student: level-2 depth 2, not 10
    if name == "sd15":
        return _device.cast_unet(tm.build("sd15", tm.SD15_TOPOLOGY, model_channels=320), DTYPE), "sd15"
    if name == "tiny-sd":
        return _device.cast_unet(tm.build("sd15", tm.TINY_SD_TOPOLOGY, model_channels=320), DTYPE), "sd15"
    return _device.cast_unet(tm.build("sdxl", vega, model_channels=320), DTYPE), "sdxl"


def _drop_attention(base):
    """The attention-free bound: the patched level's self-attentions return q (no attention work at all)."""
    from distilled_unets.models import gri

    m = base.clone()
    for s in gri.select_sites(gri.attention_sites(base.model.diffusion_model), 1, True):
        m.set_model_attn1_replace(lambda q, k, v, extra: q, s.block_name, s.block_id, s.index)
    return m


def unet_part(args):
    import comfy.ldm.modules.attention as attn
    import comfy.model_management as mm
    import torch
    from comfy_extras.nodes_hypertile import HyperTile
    from distilled_unets.models import gri
    from distilled_unets.nodes.attention import patch_gri

    print(f"\n## whole UNet: one forward, batch 1, full width, random weights; window {args.window}, "
          f"pool {args.pool or 'auto'}; median of {args.reps} interleaved rounds")
    print("   bound = the same UNet with the patched level's self-attention removed (no attention work): no "
          "attention patch can beat it")
    cpu_default = args.cpu_default_exact and DEVICE.type == "cpu"
    print(f"{'model':11} {'px':>5} | {'exact s':>8} {'ht s':>7} {'gri s':>7} {'bound s':>8} | {'gri/exact':>9} "
          f"{'gri/ht':>7} {'ht/exact':>8} {'bound/exact':>11}" + (f" | {'cpu-default exact s':>19} {'gri vs it':>9}"
                                                                  if cpu_default else "")
          + (f" | {'peak MiB exact':>14} {'ht':>6} {'gri':>6}" if DEVICE.type == "cuda" else ""))
    for name in args.unet_models:
        base, family = _unet(name)
        sites = gri.attention_sites(base.model.diffusion_model)
        top_level = min(s.level for s in sites)
        res = HyperTile.execute(base, args.window * 8, 1, top_level, False)
        ht = res[0] if isinstance(res, tuple) else res.result[0]
        fast, _ = patch_gri(base, window=args.window, pool=args.pool or None)
        bound = _drop_attention(base)
        for px in args.unet_sizes:
            side = px // 8
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, 4, side, side, generator=g).to(DEVICE)
            ctx_w = 768 if family == "sd15" else 2048
            ctx = torch.randn(1, 77, ctx_w, generator=g).to(DEVICE)
            sigma = torch.tensor([5.0], device=DEVICE)
            extra = {"y": torch.randn(1, 2816, generator=g).to(DEVICE)} if family == "sdxl" else {}

            def step(p, x=x, ctx=ctx, sigma=sigma, extra=extra):
                mm.load_models_gpu([p])  # on a GPU: the weights on the device before the clock starts
                to = dict(p.model_options["transformer_options"])
                to["sigmas"] = sigma
                _device.sync(DEVICE)
                t = time.perf_counter()
                with torch.no_grad():
                    p.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to, **extra)
                _device.sync(DEVICE)
                return time.perf_counter() - t

            runs = {"gri": fast, "ht": ht, "exact": base, "bound": bound}
            times = {tag: [] for tag in runs}
            for _ in range(args.reps):  # interleaved: machine noise hits every column alike
                for tag, p in runs.items():
                    times[tag].append(step(p))
            t = {tag: statistics.median(v) for tag, v in times.items()}
            label = "sdxl(vega)" if name == "sdxl" else name
            line = (f"{label:11} {px:5d} | {t['exact']:8.2f} {t['ht']:7.2f} {t['gri']:7.2f} {t['bound']:8.2f} | "
                    f"{t['exact'] / t['gri']:8.2f}x {t['ht'] / t['gri']:6.2f}x {t['exact'] / t['ht']:7.2f}x "
                    f"{t['exact'] / t['bound']:10.2f}x")
            if DEVICE.type == "cuda":
                peaks = [_peak_mem(lambda p=p: step(p)) for p in (base, ht, fast)]
                line += " | " + f"{peaks[0]:14.0f} {peaks[1]:6.0f} {peaks[2]:6.0f}"
            if cpu_default:
                # exact attention as ComfyUI runs it on a CPU by default (no --use-pytorch-cross-attention)
                saved = attn.optimized_attention
                attn.optimized_attention = attn.attention_sub_quad
                try:
                    t_cd = step(base)
                finally:
                    attn.optimized_attention = saved
                line += f" | {t_cd:19.2f} {t_cd / t['gri']:8.2f}x"
            print(line, flush=True)
        del base, ht, fast, bound


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--pool", type=int, default=0, help="0 = auto (models.gri.auto_pool), as the node's default")
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--unet-sizes", default="512,1024")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--unet-models", default="sd15,tiny-sd,sdxl")
    ap.add_argument("--cpu-default-exact", action="store_true",
                    help="also time one exact step with ComfyUI's CPU-default attention (sub-quadratic; slow)")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.unet_sizes = [int(s) for s in args.unet_sizes.split(",") if s]
    args.unet_models = [m for m in args.unet_models.split(",") if m]
    _setup()
    import torch

    if DEVICE.type == "cpu":
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("distilled_unets").setLevel(logging.WARNING)
    print(_device.describe(DEVICE, DTYPE))
    if not args.skip_attention:
        attention_part(args)
    if not args.skip_unet:
        unet_part(args)
    print(_device.peak_line(DEVICE))


if __name__ == "__main__":
    main()
