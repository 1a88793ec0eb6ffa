# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: GRI attention vs exact attention vs ComfyUI's HyperTile at equal window, side by side.

Part 1, attention only: the self-attention op of the highest-resolution attention level at its real
width (SD1.5 / tiny-sd: 320 ch, 8 heads x 40; SDXL: the 2x-down level, 640 ch, 10 heads x 64), batch 2
(cond + uncond), times the number of such blocks in the UNet (SD1.5 5, tiny-sd 3, SDXL 10):
  exact         full self-attention (ComfyUI's attention_pytorch)
  hypertile     what HyperTile does: q cut into window x window tiles, ComfyUI's backend
  gri           models/patches/gri.py (windows + pooled global keys in one SDPA call)
Exact attention at 2048 px on a CPU is extrapolated from a slice of the queries (cost is linear in
queries; marked "~"); a GPU runs it whole. Peak memory: torch.cuda.max_memory_allocated on a GPU, the
process RSS above its level before the call on a CPU (psutil, polled every 1 ms). Every attention,
exact and HyperTile included, runs through ComfyUI's ``attention_pytorch`` (torch SDPA, ComfyUI's
default on GPUs and with --use-pytorch-cross-attention); ComfyUI's CPU default, sub-quadratic
attention, is 4-7x slower still for exact attention, which would flatter GRI.

Part 2, GRI's own cost: one GRI call of SD1.5's top level per size, split by op with torch.profiler
(device time on a GPU, CPU time on a CPU): the window copies in and out, the pooling, the softmax
(SDPA) and the host syncs (none expected).

Part 3, whole UNet: one UNet forward (batch 1: one conditioning, no CFG batch) through ComfyUI's
own UNetModel at FULL width with random weights, unpatched / HyperTile node / GRIAttention node / the
bound (the patched level's self-attention replaced by nothing: what no attention patch can beat).
Models: SD1.5 and tiny-sd; for SDXL the Segmind-Vega topology (a real SDXL student, level-2 depth 2
instead of 10). Each UNet is built once, where it runs (ComfyUI's classes constructed on the device,
weights drawn there from a seeded generator), and every column runs once before the clock starts.
Interleaved rounds (``_device.steady_rounds``): at least --reps, more while a row's spread (median - best) / best
exceeds 5 %, up to --max-rounds; the figure is the median. Times in milliseconds, three significant figures.

    python bench/bench_gri.py [--window 16] [--pool 0] [--sizes 512,1024,2048]
        [--unet-sizes 1024,2048] [--reps 3] [--max-rounds 12] [--threads 1] [--skip-unet]

Device: CUDA in fp16 when a GPU is there, else the CPU in fp32 (bench/_device.py; BENCH_DEVICE /
BENCH_DTYPE override). Times: wall time on a GPU; on a CPU the process's CPU time (CPU machines here
are shared, and wall time there measures the neighbours), so run CPU measurements with --threads 1.
On 2 CPU cores a full-width 2048 px forward takes minutes per column (exact
attention alone about 5 min for SD1.5), so CPU runs use --unet-sizes 512,1024; 2048 px whole-UNet rows
are a GPU measurement.

The last two lines are the ones run_all.py reads back: ``bench phases: setup X s, measure Y s`` (setup:
imports, building the UNets, patching, warm-up; measure: the timed rounds) and the peak memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings

import _device
from _device import ms3, sig3
from _pack import ROOT, import_pack, random_patcher, setup_comfy  # noqa: E402

PH = _device.Phases()  # setup counts from the process's start; the timed rounds and probes are measuring
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
    now = _device.clock_for(DEVICE)
    with PH.measure():
        for _ in range(reps):
            _device.sync(DEVICE)
            t = now()
            fn()
            _device.sync(DEVICE)
            best = min(best, now() - t)
    return best


def _peak_mem(fn) -> float:
    """MiB above the level before the call: torch.cuda.max_memory_allocated on a GPU, else the process RSS
    sampled every 1 ms by a thread (psutil; tracemalloc does not see torch's allocator)."""
    with PH.measure():
        return _device.peak_mib(fn, DEVICE)


def hypertile_attention(q, k, v, heads, h, w, tile, attn):
    """HyperTile's tiling of q (k, v untouched; the backend views them by q's batch), then un-tiling."""
    from einops import rearrange

    nh, nw = max(1, h // tile), max(1, w // tile)
    qt = rearrange(q, "b (nh h nw w) c -> (b nh nw) (h w) c", h=h // nh, w=w // nw, nh=nh, nw=nw)
    out = attn(qt, k, v, heads)
    out = rearrange(out, "(b nh nw) hw c -> b nh nw hw c", nh=nh, nw=nw)
    return rearrange(out, "b nh nw (h w) c -> b (nh h nw w) c", h=h // nh, w=w // nw)


def _qkv(L, ch, seed):
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)  # drawn on the device, in its dtype
    return tuple(torch.randn(2, L, ch, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(3))


def attention_part(args):
    import comfy.ldm.modules.attention as attn
    from distilled_unets.models.patches import gri

    optimized_attention = attn.optimized_attention

    pool = args.pool or None
    print(f"\n## attention only: top self-attention level, batch 2, x blocks per UNet; window {args.window}, "
          f"pool {args.pool or 'auto'}; ms, best of {args.reps}")
    print(f"{'model':8} {'px':>5} {'grid':>8} {'pool':>4} | {'exact ms':>9} {'hypertile ms':>12} {'gri ms':>8} "
          f"{'shifted ms':>10} | {'exact/gri':>9} {'ht/gri':>7} | {'MiB exact':>9} {'ht':>6} {'gri':>6}")
    for name, down, ch, heads, blocks in ATTN_MODELS:
        for px in args.sizes:
            side = px // 8 // down
            L = side * side
            p = gri.auto_pool(side, side, args.window) if pool is None else pool
            q, k, v = _qkv(L, ch, 0)
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

            for fn in (fast, shifted, ht, exact):  # warm-up: layouts, allocator, kernels picked
                fn()
            t_gri = _time(fast, args.reps) * blocks
            t_sh = _time(shifted, args.reps) * blocks
            t_ht = _time(ht, args.reps) * blocks
            t_ex = _time(exact, 1 if sub > 1 else args.reps) * blocks * sub
            m_ex = _peak_mem(exact) if sub == 1 else float("nan")
            m_ht, m_gri = _peak_mem(ht), _peak_mem(fast)
            mark = "~" if sub > 1 else " "
            print(f"{name:8} {px:5d} {side:>3}x{side:<4} {p:4d} | {mark}{ms3(t_ex):>8} {ms3(t_ht):>12} {ms3(t_gri):>8} "
                  f"{ms3(t_sh):>10} | "
                  f"{t_ex / t_gri:8.2f}x {t_ht / t_gri:6.2f}x | {m_ex:9.0f} {m_ht:6.0f} {m_gri:6.0f}", flush=True)
            del q, k, v


# what each aten op of a GRI call is for (the rest is listed as it is named)
OP_ROLES = {"copy_": "window copies in (q, k, v) and out, pooled keys into their slots",
            "avg_pool2d": "pooling k and v (global keys)",
            "_local_scalar_dense": "HOST SYNC (a device value read on the host)"}


def own_cost_part(args):
    """Where one GRI call's time goes, by aten op (torch.profiler): device time on a GPU, CPU time on a CPU."""
    from distilled_unets.models.patches import gri
    from torch.profiler import ProfilerActivity, profile

    name, down, ch, heads, blocks = ATTN_MODELS[0]
    cuda = DEVICE.type == "cuda"
    what = "device (CUDA) time" if cuda else "CPU time (the profiler's wall time per op)"
    n_calls = 5
    for px in args.sizes:
        side = px // 8 // down
        p = gri.auto_pool(side, side, args.window) if not args.pool else args.pool
        q, k, v = _qkv(side * side, ch, 0)

        def call(q=q, k=k, v=v, side=side, p=p):
            return gri.gri_attention(q, k, v, heads, side, side, window=args.window, pool=p)

        call()
        _device.sync(DEVICE)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with PH.measure(), profile(activities=acts) as prof:
            for _ in range(n_calls):
                call()
            _device.sync(DEVICE)
        rows = []
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue
            t = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
                else e.self_cpu_time_total
            if t > 0 or e.key == "aten::_local_scalar_dense":
                rows.append((e.key[len("aten::"):], e.count / n_calls, t / n_calls / 1e3))
        rows.sort(key=lambda r: -r[2])
        total = sum(r[2] for r in rows)
        syncs = sum(r[1] for r in rows if r[0] == "_local_scalar_dense")
        print(f"\n## GRI's own cost: one call, {name} top level at {px} px ({side}x{side} tokens, {ch} ch, batch 2), "
              f"window {args.window}, pool {p}; {what} by op, mean of {n_calls} calls; host syncs per call: {syncs:g}")
        print(f"{'op':46} {'calls':>5} {'ms':>8} {'share':>6}  role")
        shown = [r for r in rows if r[2] >= 0.005 * total or r[0] == "_local_scalar_dense"]
        for op, calls, t in shown:
            role = OP_ROLES.get(op, "the softmax over window + pooled keys" if op.startswith("_") and "attention"
                                in op else "")
            print(f"{op:46} {calls:5.0f} {sig3(t):>8} {t / total * 100:5.1f}%  {role}")
        rest = total - sum(r[2] for r in shown)
        print(f"{'the rest (views, allocation, dispatch)':46} {'':>5} {sig3(rest):>8} {rest / total * 100:5.1f}%")
        print(f"{'total':46} {'':>5} {sig3(total):>8}")
        del q, k, v


def _unet(name):
    import _tiny_models as tm
    from distilled_unets.models.structure import registry

    vega = registry.by_id("segmind/Segmind-Vega").structure  # a real SDXL student: level-2 depth 2, not 10
    topo, family = {"sd15": (registry.TEACHERS["sd1"].structure, "sd15"),
                    "tiny-sd": (registry.by_id("segmind/tiny-sd").structure, "sd15"),
                    "sdxl": (vega, "sdxl")}[name]
    return random_patcher(tm.tiny(topo, family, model_channels=topo.model_channels), DTYPE, DEVICE, 0), family


def _drop_attention(base):
    """The attention-free bound: the patched level's self-attentions return q (no attention work at all)."""
    from distilled_unets.models.patches import gri

    m = base.clone()
    for s in gri.select_sites(gri.attention_sites(base.model.diffusion_model), 1, True):
        m.set_model_attn1_replace(lambda q, k, v, extra: q, s.block_name, s.block_id, s.index)
    return m


def unet_part(args):
    import comfy.ldm.modules.attention as attn
    import comfy.model_management as mm
    import torch
    from comfy_extras.nodes_hypertile import HyperTile
    from distilled_unets.models.patches import gri
    from distilled_unets.nodes.attention import patch_gri

    cuda = DEVICE.type == "cuda"
    now = _device.clock_for(DEVICE)
    print(f"\n## whole UNet: one forward, batch 1, full width, random weights; window {args.window}, "
          f"pool {args.pool or 'auto'}; ms, median of at least {args.reps} interleaved rounds (more while a spread "
          f"(median - best) / best is above {_device.SPREAD_GOAL:.0%}, at most {args.max_rounds})")
    print("   bound = the same UNet with the patched level's self-attention removed (no attention work): no "
          "attention patch can beat it; gri/bound = how far GRI is from it")
    cpu_default = args.cpu_default_exact and not cuda
    print(f"{'model':11} {'px':>5} | {'exact ms':>9} {'ht ms':>8} {'gri ms':>8} {'bound ms':>9} | {'gri/exact':>9} "
          f"{'gri/ht':>7} {'ht/exact':>8} {'bound/exact':>11} {'gri/bound':>9} | {'spread %':>8} {'rounds':>6}"
          + (f" | {'cpu-default exact ms':>20} {'gri vs it':>9}" if cpu_default else "")
          + (f" | {'peak MiB exact':>14} {'ht':>6} {'gri':>6}" if cuda else ""), flush=True)
    for name in args.unet_models:
        base, family = _unet(name)  # built once per process, on the device
        sites = gri.attention_sites(base.model.diffusion_model)
        top_level = min(s.level for s in sites)
        res = HyperTile.execute(base, args.window * 8, 1, top_level, False)
        ht = res[0] if isinstance(res, tuple) else res.result[0]
        fast, _ = patch_gri(base, window=args.window, pool=args.pool or None)
        bound = _drop_attention(base)
        for px in args.unet_sizes:
            side = px // 8
            g = torch.Generator(device=DEVICE).manual_seed(1)
            x = torch.randn(1, 4, side, side, generator=g, device=DEVICE)
            ctx_w = 768 if family == "sd15" else 2048
            ctx = torch.randn(1, 77, ctx_w, generator=g, device=DEVICE)
            sigma = torch.tensor([5.0], device=DEVICE)
            extra = {"y": torch.randn(1, 2816, generator=g, device=DEVICE)} if family == "sdxl" else {}

            def step(p, x=x, ctx=ctx, sigma=sigma, extra=extra):
                mm.load_models_gpu([p])  # the weights on the device before the clock starts (a no-op here)
                to = dict(p.model_options["transformer_options"])
                to["sigmas"] = sigma
                _device.sync(DEVICE)
                t = now()
                with torch.no_grad():
                    p.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to, **extra)
                _device.sync(DEVICE)
                return now() - t

            runs = {"gri": fast, "ht": ht, "exact": base, "bound": bound}
            for p in runs.values():  # warm-up, off the clock: kernels picked, layouts and masks built
                for _ in range(2 if cuda else 1):
                    step(p)
            with PH.measure():
                res = _device.steady_rounds({tag: (lambda p=p: step(p)) for tag, p in runs.items()}, args.reps,
                                            args.max_rounds)
            t = {tag: statistics.median(v) for tag, v in res.items()}
            worst = max(_device.spread(v) for v in res.values()) * 100
            label = "sdxl(vega)" if name == "sdxl" else name
            line = (f"{label:11} {px:5d} | {ms3(t['exact']):>9} {ms3(t['ht']):>8} {ms3(t['gri']):>8} "
                    f"{ms3(t['bound']):>9} | {t['exact'] / t['gri']:8.2f}x {t['ht'] / t['gri']:6.2f}x "
                    f"{t['exact'] / t['ht']:7.2f}x {t['exact'] / t['bound']:10.2f}x {t['gri'] / t['bound']:8.3f}x | "
                    f"{worst:8.1f} {len(res['gri']):6d}")
            if cpu_default:
                # exact attention as ComfyUI runs it on a CPU by default (no --use-pytorch-cross-attention)
                saved = attn.optimized_attention
                attn.optimized_attention = attn.attention_sub_quad
                try:
                    with PH.measure():
                        t_cd = step(base)
                finally:
                    attn.optimized_attention = saved
                line += f" | {ms3(t_cd):>20} {t_cd / t['gri']:8.2f}x"
            if cuda:
                peaks = [_peak_mem(lambda p=p: step(p)) for p in (base, ht, fast)]
                line += " | " + f"{peaks[0]:14.0f} {peaks[1]:6.0f} {peaks[2]:6.0f}"
            print(line, flush=True)
            del x, ctx, extra
        del base, ht, fast, bound
        mm.soft_empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--pool", type=int, default=0,
                    help="0 = auto (models.patches.gri.auto_pool), as the node's default")
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--unet-sizes", default="1024,2048")
    ap.add_argument("--reps", type=int, default=3, help="rounds kept per row (the fastest ones)")
    ap.add_argument("--max-rounds", type=int, default=12, help="at most this many rounds while a spread is > 5 %%")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-own-cost", action="store_true")
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
    print(f"{_device.describe(DEVICE, DTYPE)}; times: {_device.clock_name(DEVICE)}")
    if not args.skip_attention:
        attention_part(args)
    if not args.skip_own_cost:
        own_cost_part(args)
    if not args.skip_unet:
        unet_part(args)
    print(PH.line())
    print(_device.peak_line(DEVICE))


if __name__ == "__main__":
    main()
