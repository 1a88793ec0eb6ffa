# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: what CLME-CondConv costs per sampling step (A-SDM §2.3 claims "almost nothing"), side by side.

A tiny-sd-structured student (3 levels, one resnet per level, no mid block) at FULL width (model_channels
320, SD1.5 family, random weights) through ComfyUI's own UNetModel, plain and with the 3x3 convolutions of
its shallowest down and up stage (resnet convs and the level-0 downsampler: 7 convs) replaced by
identity-initialised CondConv (``--experts`` experts, nodes/_condconv.py). Runs alternate between the two
in every round (the same UNet, the convs swapped in and out), best of ``--reps``:

  UNet step      one UNet forward (what one sampler step costs per model call), latent 64x64 = 512 px
  swapped convs  the swapped convs alone on the inputs they get in that forward: plain Conv2d vs CondConv
                 (routing + kernel mixing + one grouped conv), summed over the 7 convs
  routing+mix    of that, the CondConv-only work (gates from the pooled input, the per-sample kernel mix)

Device: ``--device`` or ``BENCH_DEVICE`` (cpu, cuda); dtype fp32 on CPU, fp16 on CUDA unless ``--dtype``.
Attention runs through ComfyUI's ``attention_pytorch`` (torch SDPA: ComfyUI's GPU default) on every device.

    ~/venv/bin/python bench/bench_condconv.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--batches 1,2]
        [--size 64] [--experts 2] [--reps 3] [--conv-reps 5] [--threads N] [--skip-unet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _pack import ROOT, import_pack, setup_comfy  # noqa: E402

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _setup(device: str):
    os.environ["BENCH_DEVICE"] = device
    setup_comfy()
    import comfy.ldm.modules.attention as attn

    if hasattr(attn, "attention_pytorch"):
        attn.optimized_attention = attn.attention_pytorch
    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))


def _build(tm, dtype, device, channels: int, seed: int = 0):
    from distilled_unets.nodes._glue import comfy_model

    model = comfy_model(tm.tiny(tm.TINY_SD_TOPOLOGY, "sd15", model_channels=channels), dtype, None)
    tm.init_weights(model.diffusion_model, seed)
    return model.diffusion_model.to(device).eval()


def _put(unet, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(unet.get_submodule(parent), name, module)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cpu"), choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on cpu, fp16 on cuda")
    ap.add_argument("--batches", default="1,2", help="UNet batch sizes (2 = cond + uncond)")
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--channels", type=int, default=320, help="model_channels (tiny-sd: 320)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="UNet forwards per variant (best of)")
    ap.add_argument("--conv-reps", type=int, default=5, help="passes over the swapped convs per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--skip-unet", action="store_true", help="only the swapped convs (one UNet forward records "
                    "their inputs)")
    a = ap.parse_args(argv)

    _setup(a.device)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import _tiny_models as tm
    from distilled_unets.models.condconv import CondConv2d, conv_geometry
    from distilled_unets.nodes._condconv import stage_conv_paths, swap_condconv

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu")
        return 2
    dev = torch.device(a.device)
    dtype = getattr(torch, DTYPES[a.dtype or ("fp16" if a.device == "cuda" else "fp32")])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    unet = _build(tm, dtype, dev, a.channels)
    paths = stage_conv_paths(unet, 0, include_resample=False)  # the resnet convs BuildStudentUNet swaps
    plain = {p: unet.get_submodule(p) for p in paths}
    g = torch.Generator().manual_seed(0)
    swap_condconv(unet, {p: CondConv2d.from_conv(c.weight.float().cpu(), c.bias.float().cpu(), (),
                                                 num_experts=a.experts, generator=g, **conv_geometry(c))
                         for p, c in plain.items()})
    cond = {p: unet.get_submodule(p) for p in paths}
    n_plain = sum(p.numel() for p in unet.parameters()) - sum(
        sum(q.numel() for q in m.parameters()) - sum(q.numel() for q in plain[p].parameters()) for p, m in cond.items())
    n_cond = sum(p.numel() for p in unet.parameters())

    def use(variant):
        for p in paths:
            _put(unet, p, variant[p])

    # the inputs every swapped conv sees (recorded once per batch size)
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, tuple(args[0].shape)))
             for p, m in cond.items()]

    def inputs(batch):
        gi = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 4, a.size, a.size, generator=gi).to(dev, dtype)
        ctx = torch.randn(batch, 77, 768, generator=gi).to(dev, dtype)
        return x, torch.full((batch,), 500.0, device=dev), ctx

    def step(x, t, ctx):
        sync()
        t0 = time.perf_counter()
        out = unet(x, timesteps=t, context=ctx)
        sync()
        return time.perf_counter() - t0, out

    def convs(variant, xs):
        sync()
        t0 = time.perf_counter()
        for _ in range(a.conv_reps):
            for p in paths:
                variant[p](xs[p])
        sync()
        return (time.perf_counter() - t0) / a.conv_reps

    def route_mix(xs):  # the CondConv-only work: gates from the pooled input and the per-sample kernel mix
        sync()
        t0 = time.perf_counter()
        for _ in range(a.conv_reps):
            for p in paths:
                m = cond[p]
                r = m.gates(xs[p])
                (r @ m.weight.to(r.dtype).reshape(m.num_experts, -1)).to(dtype)
        sync()
        return (time.perf_counter() - t0) / a.conv_reps

    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in a.batches.split(",")]:
            x, t, ctx = inputs(batch)
            use(cond)
            _, out_c = step(x, t, ctx)  # warm-up + records the conv inputs
            use(plain)
            _, out_p = step(x, t, ctx)
            err = ((out_c.float() - out_p.float()).abs().max() / out_p.float().abs().max()).item()
            steps = {"plain": [], "cond": []}
            for _ in range(0 if a.skip_unet else a.reps):
                for name, variant in (("plain", plain), ("cond", cond)):
                    use(variant)
                    steps[name].append(step(x, t, ctx)[0])
            gx = torch.Generator().manual_seed(batch + 100)
            xs = {p: torch.randn(seen[p], generator=gx).to(dev, dtype) for p in paths}
            conv_t = {"plain": [], "cond": [], "route": []}
            convs(plain, xs), convs(cond, xs), route_mix(xs)  # warm-up
            for _ in range(a.reps):
                for name, variant in (("plain", plain), ("cond", cond)):
                    conv_t[name].append(convs(variant, xs))
                conv_t["route"].append(route_mix(xs))
            rows.append((batch, steps, conv_t, err))
    for h in hooks:
        h.remove()
    use(plain)

    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"CondConv bench: tiny-sd structure, model_channels {a.channels}"
          + (" (full width)" if a.channels == 320 else " (REDUCED width)")
          + f", latent {a.size}x{a.size} ({a.size * 8} px), {where}, {dname}, best of {a.reps} interleaved runs")
    print(f"CondConv K={a.experts} on {len(paths)} convs: {', '.join(paths)}")
    print(f"parameters: plain {n_plain / 1e6:.2f}M, with CondConv {n_cond / 1e6:.2f}M "
          f"({(n_cond / n_plain - 1) * 100:+.2f} %)")
    print()
    print("ratio: CondConv / plain, the median of per-round ratios (each round runs both back to back, so slow "
          "drift cancels); ms: best of the rounds; delta: (convs CondConv - convs plain) / step plain")
    print(f"{'batch':>5} | {'step plain ms':>13} | {'step CondConv ms':>16} | {'step ratio':>10} | "
          f"{'convs plain ms':>14} | {'convs CondConv ms':>17} | {'convs ratio':>11} | {'delta % of step':>15} |"
          f" {'routing+mix ms':>14} | {'init max rel diff':>17}")
    for batch, steps, conv_t, err in rows:
        c_ratio = statistics.median(c / p for c, p in zip(conv_t["cond"], conv_t["plain"]))
        if steps["plain"]:
            s_plain, s_cond = min(steps["plain"]), min(steps["cond"])
            s_ratio = statistics.median(c / p for c, p in zip(steps["cond"], steps["plain"]))
            delta = (min(conv_t["cond"]) - min(conv_t["plain"])) / s_plain * 100
            step_cols = f"{s_plain * 1e3:13.1f} | {s_cond * 1e3:16.1f} | {s_ratio:10.4f}"
            delta_col = f"{delta:+15.2f}"
        else:
            step_cols, delta_col = f"{'-':>13} | {'-':>16} | {'-':>10}", f"{'-':>15}"
        print(f"{batch:>5} | {step_cols} | {min(conv_t['plain']) * 1e3:14.2f} | {min(conv_t['cond']) * 1e3:17.2f} | "
              f"{c_ratio:11.3f} | {delta_col} | {min(conv_t['route']) * 1e3:14.2f} | {err:17.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
