# ruff: noqa: T201  (bench scripts print their tables)
"""Per-step UNet time of loaded students: our build vs ComfyUI's own build vs the teacher.

For each model, random weights in the real (full-size) structure are drawn on the device (a GPU draws
them itself) and kept in RAM in fp16 as a diffusers-layout state dict, as a file read from disk would be; they are
loaded through the pack's loader path (detection -> ComfyUI's UNetModel), and, where ComfyUI 0.3.64 can
detect the structure itself, through ``comfy.sd.load_diffusion_model_state_dict`` on the ldm layout: each
model built once. One UNet evaluation (batch 2: cond + uncond) is timed for each, after warm-up,
interleaved round by round so machine noise hits both alike (``--rounds`` rounds, more up to
``--max-rounds`` while a row's spread is above 5 %); the table gives medians (milliseconds, three
significant figures) and ratios, and whether the two builds are the same module tree (classes, tensor
names, shapes, dtypes, strides): when they are, any time difference between them is machine noise.

    python bench/bench_loader.py --comfyui ~/ComfyUI                     # SD1 + SD2 at 512 px
    python bench/bench_loader.py --families sdxl --sdxl-px 1024          # SDXL (needs ~40 GB RAM in fp32)
    python bench/bench_loader.py --families sd1,sd2,sdxl                 # on a GPU: cuda, fp16 by default

Device: CUDA in fp16 when a GPU is there, else the CPU in fp32 (bench/_device.py; --device / --dtype, or
BENCH_DEVICE / BENCH_DTYPE, override); on a GPU the peak memory of each build's step
(torch.cuda.max_memory_allocated) is a column.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time

import _device
import torch
from _pack import ROOT, comfyui, import_pack, random_state_dict  # noqa: E402

MODELS = {
    "sd1": ["SD 1.x (v1.4 / v1.5)", "segmind/small-sd", "nota-ai/bk-sdm-small", "segmind/tiny-sd"],
    "sd2": ["SD 2.1-base", "nota-ai/bk-sdm-v2-base", "nota-ai/bk-sdm-v2-small", "nota-ai/bk-sdm-v2-tiny"],
    "sdxl": ["SDXL 1.0 base", "segmind/SSD-1B", "segmind/Segmind-Vega", "etri-vilab/koala-700m",
             "etri-vilab/koala-1b"],
}


def _import_pack():
    import_pack()
    sys.path.insert(0, str(ROOT))
    from tests.layouts import diffusers_model, to_ldm  # noqa: E402

    return diffusers_model, to_ldm


def same_build(a, b) -> bool:
    """True when two ModelPatchers hold the same module tree: same classes in the same order and every
    tensor with the same name, shape, dtype and strides (so any time difference between them is noise)."""
    ma, mb = a.model.diffusion_model, b.model.diffusion_model
    if [type(m) for m in ma.modules()] != [type(m) for m in mb.modules()]:
        return False
    ta, tb = ma.state_dict(), mb.state_dict()
    return ta.keys() == tb.keys() and all(
        (x.shape, x.dtype, x.stride()) == (tb[k].shape, tb[k].dtype, tb[k].stride()) for k, x in ta.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, the enclosing ComfyUI or ~/ComfyUI)")
    ap.add_argument("--families", default="sd1,sd2")
    ap.add_argument("--models", default="", help="comma-separated model ids to time (default: all of each family; "
                    "the family's teacher is always timed, the speed-ups are against it)")
    ap.add_argument("--px", type=int, default=512, help="image size for SD1/SD2")
    ap.add_argument("--sdxl-px", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=0, help="bound on the rounds (default 3 x --rounds)")
    ap.add_argument("--device", default=None, help="default: cuda when a GPU is there, else cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    ph = _device.Phases()
    dev, default_dtype = _device.setup(args.device)
    args.device = str(dev)
    args.dtype = args.dtype or _device.dtype_name(default_dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(comfyui(args.comfyui)))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.model_management as mm
    import comfy.sd

    diffusers_model, to_ldm = _import_pack()
    from distilled_unets.models.structure import registry
    from distilled_unets.models.structure.cost import unet_cost
    from distilled_unets.models.structure.detect import detect
    from distilled_unets.models.structure.topology import diffusers_config
    from distilled_unets.nodes.host.unet import build_model

    dtype = _device.DTYPES[args.dtype]
    gpu = dev.type == "cuda"
    max_rounds = args.max_rounds or 3 * args.rounds
    rows, peaks = [], {}
    for fam in args.families.split(","):
        px = args.sdxl_px if fam == "sdxl" else args.px
        lat = px // 8
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, 4, lat, lat, generator=g, device=dev, dtype=dtype)
        ctx = torch.randn(2, 77, registry.TEACHERS[fam].structure.context_dim, generator=g, device=dev, dtype=dtype)
        y = torch.randn(2, 2816, generator=g, device=dev, dtype=dtype) if fam == "sdxl" else None
        t = torch.tensor([500.0, 500.0], device=dev)
        times, entries, same = {}, {}, {}

        def step(patcher, key=None):
            mm.load_models_gpu([patcher])
            net = patcher.model.diffusion_model
            # on a GPU the step's own peak, above the loaded weights (its counters reset outside the clock)
            pm = _device.PeakMemory(dev) if key is not None and gpu else contextlib.nullcontext()
            with torch.no_grad(), pm:
                _device.sync(dev)
                t0 = time.perf_counter()
                net(x, timesteps=t, context=ctx, y=y)
                _device.sync(dev)
                secs = time.perf_counter() - t0
            if isinstance(pm, _device.PeakMemory):
                peaks[key] = max(peaks.get(key, 0.0), pm.mib)
            return secs

        # one model at a time (memory), our build and ComfyUI's interleaved round by round
        wanted = [m for m in args.models.split(",") if m]
        for i, mid in enumerate(m for j, m in enumerate(MODELS[fam]) if j == 0 or not wanted or m in wanted):
            e = entries[mid] = registry.by_id(mid)
            cfg = diffusers_config(e.structure)
            shapes = {k: v.shape for k, v in diffusers_model(cfg, device="meta").state_dict().items()}
            # the "file": fp16 as most downloads are (half the RAM of fp32), cast by each build to --dtype
            sd = random_state_dict(shapes, torch.float16, dev, seed=i, to="cpu")
            det = detect({k: tuple(v.shape) for k, v in sd.items()})
            ours = build_model(det.topology, {det.key_map[k]: v for k, v in sd.items()}, weight_dtype=args.dtype)
            theirs = None
            try:
                theirs = comfy.sd.load_diffusion_model_state_dict(to_ldm(sd, cfg, gapped=False),
                                                                  model_options={"dtype": dtype})
            except Exception as ex:  # ComfyUI cannot build every structure
                print(f"  ComfyUI's own build of {mid} failed: {type(ex).__name__}: {ex}", file=sys.stderr)
            del sd
            same[mid] = same_build(ours, theirs) if theirs is not None else None
            for _ in range(2):  # warm-up (allocator, first-call caches) for both builds
                step(ours)
                if theirs is not None:
                    step(theirs)
            fns = {(mid, "ours"): lambda p=ours, k=(mid, "ours"): step(p, k)}
            if theirs is not None:
                fns[(mid, "comfy")] = lambda p=theirs, k=(mid, "comfy"): step(p, k)
            ph.measuring()
            times.update(_device.steady_rounds(fns, args.rounds, max_rounds))
            ph.setting_up()
            times.setdefault((mid, "comfy"), [])
            del ours, theirs, fns
            mm.unload_all_models()
            gc.collect()
        teacher_t = statistics.median(times[(MODELS[fam][0], "ours")])
        tcost = unet_cost(registry.TEACHERS[fam].structure, lat, lat).macs
        for mid, e in entries.items():
            o = statistics.median(times[(mid, "ours")])
            c = statistics.median(times[(mid, "comfy")]) if times[(mid, "comfy")] else None
            est = unet_cost(e.structure, lat, lat).macs / tcost
            spread = max(_device.spread(v) for k, v in times.items() if k[0] == mid and v)
            rows.append((mid, f"{px}px", o, c, (c / o) if c else None, teacher_t / o, est, same[mid], spread,
                         len(times[(mid, "ours")])))
    print(f"\nPer-step UNet time, batch 2, {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
          f"median of {args.rounds}-{max_rounds} interleaved rounds (more while a row's spread is above "
          f"{_device.SPREAD_GOAL:.0%}), after 2 warm-up steps")
    print(_device.describe(dev, dtype))
    print(f"{'model':34s} {'res':>7s} {'ours ms':>8s} {'comfy ms':>8s} {'spread':>6s} {'rounds':>6s} "
          f"{'comfy/ours':>10s} {'speed-up vs teacher':>20s} {'est. cost vs teacher':>21s} {'same module tree':>17s}"
          + (f" {'step peak MiB ours':>19s} {'comfy':>6s}" if gpu else ""))
    for mid, px, o, c, r, sp, est, sm, spread, n in rows:
        mem = ""
        if gpu:
            pc = peaks.get((mid, "comfy"))
            mem = f" {peaks.get((mid, 'ours'), float('nan')):19.0f} " + (f"{pc:6.0f}" if pc is not None else "   n/a")
        print(f"{mid:34s} {px:>7s} {_device.ms3(o):>8s} {(_device.ms3(c) if c else 'n/a'):>8s} {spread:>6.1%} "
              f"{n:>6d} {(f'{r:9.3f}x' if r else '  (cannot)')} {sp:19.2f}x {est:20.2f}x "
              f"{('n/a' if sm is None else str(sm)):>17s}{mem}")
    print(ph.line())
    print(_device.peak_line(dev))


if __name__ == "__main__":
    main()
