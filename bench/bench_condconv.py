# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: what CLME-CondConv costs per sampling step (A-SDM §2.3 claims "almost nothing"), side by side.

A tiny-sd-structured student (3 levels, one resnet per level, no mid block) at FULL width (model_channels
320, SD1.5 family, random weights) through ComfyUI's own UNetModel, built once, on the device it runs on
(ComfyUI's ops allocate on the device, the weights are drawn there from a seeded generator), plain and with
the 3x3 convolutions of its shallowest down and up stage's resnets (6 convs, the ones BuildStudentUNet swaps)
replaced by identity-initialised CondConv (``--experts`` experts, nodes/host/condconv.py, built in the dtype the
UNet runs in). Per dtype (fp16 and bf16 on CUDA, fp32 on the CPU) and batch size, in interleaved rounds (a
row whose spread (median - best) / best is above 5 % gets more rounds, up to ``--max-reps``):

  UNet step      one UNet forward (what one sampler step costs per model call), latent 64x64 = 512 px, the
                 CondConv routers set to route every sample differently (what a trained student pays: no
                 shortcut for a batch routed alike)
  swapped convs  the swapped convs alone on the inputs they get in that forward: plain Conv2d vs CondConv as
                 ``batch_mode="auto"`` runs it, and (batch > 1) each batch mode forced: per_sample, grouped,
                 expert_sum (models/patches/condconv.py, "Speed")
  routing+mix    of that, the CondConv-only work (gates from the pooled input, the kernel mix)
  ops/call       device ops of one CondConv call (torch.profiler: aten ops that launch work; a plain conv: 1)
  init diff      max |CondConv student - plain student| / max |plain| at init (zero routing), same dtype

Times: milliseconds, three significant figures, best of the rounds; ratios: the median of per-round ratios
(each round runs both back to back, so slow drift cancels). Device: ``--device`` or ``BENCH_DEVICE``.
Attention runs through ComfyUI's ``attention_pytorch`` (torch SDPA: ComfyUI's GPU default) on every device.
Ends with the phase line (setup / measure seconds) and the peak-memory line run_all.py reads.

    ~/venv/bin/python bench/bench_condconv.py [--device cpu|cuda] [--dtypes fp16,bf16] [--batches 1,2,4,8]
        [--size 64] [--channels 320] [--experts 2] [--reps 3] [--max-reps 12] [--conv-reps 5] [--threads N]
        [--clock wall|thread] [--skip-unet]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # setup counts from here (imports included)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

from _pack import import_pack, setup_comfy  # noqa: E402

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MODES = ("per_sample", "grouped", "expert_sum")


def _setup(device: str):
    os.environ["BENCH_DEVICE"] = device
    setup_comfy()
    import comfy.ldm.modules.attention as attn

    if hasattr(attn, "attention_pytorch"):
        attn.optimized_attention = attn.attention_pytorch
    import_pack()


def _build(torch, dtype, device, channels: int, seed: int = 0):
    """ComfyUI's UNetModel of the tiny-sd structure, allocated on ``device`` in ``dtype`` and drawn there."""
    from dataclasses import replace

    from distilled_unets.models.structure import structures as S
    from distilled_unets.nodes.host.unet import comfy_model

    unet = comfy_model(replace(S.BK_TINY, model_channels=channels), dtype, None, device=device).diffusion_model
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # the scales of tests/comfy/_tiny_models.init_weights, drawn on the device
        for name, p in unet.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            if p.ndim >= 2:
                r /= p[0].numel() ** 0.5
            else:
                r = 1.0 + 0.05 * r if name.endswith("weight") else 0.02 * r
            p.copy_(r)
    return unet.eval()


def _put(unet, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(unet.get_submodule(parent), name, module)


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cpu"), choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", "--dtype", default=None, help="comma-separated; default fp16,bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batches", default="1,2,4,8", help="UNet batch sizes (2 = cond + uncond)")
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--channels", type=int, default=320, help="model_channels (tiny-sd: 320)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds per row at least")
    ap.add_argument("--max-reps", type=int, default=12, help="rounds per row at most (while the spread is > 5 %%)")
    ap.add_argument("--conv-reps", type=int, default=5, help="passes over the swapped convs per round")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall", help="thread: this thread's CPU time "
                    "(CPU with --threads 1 only: steadier than wall time on a machine other jobs share)")
    ap.add_argument("--skip-unet", action="store_true", help="no UNet step rows (one forward still records the "
                    "swapped convs' inputs)")
    a = ap.parse_args(argv)

    _setup(a.device)
    import _device
    import torch
    from _device import ms3, spread

    if a.threads:
        torch.set_num_threads(a.threads)
    from distilled_unets.models.patches.condconv import CondConv2d, conv_geometry, device_ops
    from distilled_unets.nodes.host.condconv import stage_conv_paths, swap_condconv

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu")
        return 2
    if a.clock == "thread" and (a.device != "cpu" or torch.get_num_threads() != 1):
        print("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
        return 2
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    dev = torch.device(a.device)
    names = (a.dtypes or ("fp16,bf16" if dev.type == "cuda" else "fp32")).split(",")
    dtypes = [getattr(torch, DTYPES[n]) for n in names]
    batches = [int(b) for b in a.batches.split(",")]
    measure_s = 0.0

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, reps=1):
        def run():
            sync()
            t0 = clock()
            for _ in range(reps):
                fn()
            sync()
            return (clock() - t0) / reps
        return run

    unet = _build(torch, dtypes[0], dev, a.channels)
    paths = stage_conv_paths(unet, 0, include_resample=False)  # the resnet convs BuildStudentUNet swaps
    n_plain = sum(p.numel() for p in unet.parameters())
    tables = []
    for dtype in dtypes:
        if unet.dtype != dtype:
            unet.to(dtype)
            unet.dtype = dtype  # ComfyUI's UNetModel casts its input to this
        plain = {p: unet.get_submodule(p) for p in paths}
        g = torch.Generator().manual_seed(0)
        swap_condconv(unet, {p: CondConv2d.from_conv(c.weight, c.bias, (), num_experts=a.experts, generator=g,
                                                     dtype=dtype, **conv_geometry(c)) for p, c in plain.items()})
        cond = {p: unet.get_submodule(p) for p in paths}
        n_cond = sum(p.numel() for p in unet.parameters())

        def use(variant):
            for p in paths:
                _put(unet, p, variant[p])

        seen: dict[str, torch.Tensor] = {}
        rows = []
        with torch.inference_mode():
            for batch in batches:
                gi = torch.Generator(device=dev).manual_seed(batch)
                x = torch.randn(batch, 4, a.size, a.size, generator=gi, device=dev, dtype=dtype)
                ctx = torch.randn(batch, 77, 768, generator=gi, device=dev, dtype=dtype)
                t = torch.linspace(999.0, 1.0, batch, device=dev)
                for m in cond.values():
                    m.routing_weight.zero_()
                use(plain)
                out_p = unet(x, timesteps=t, context=ctx).float()
                use(cond)
                hooks = [m.register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, args[0].clone()))
                         for p, m in cond.items()]
                out_c = unet(x, timesteps=t, context=ctx).float()  # also records the swapped convs' inputs
                for h in hooks:
                    h.remove()
                err = ((out_c - out_p).abs().max() / out_p.abs().max()).item()
                gr = torch.Generator(device=dev).manual_seed(7)
                for m in cond.values():  # a trained-looking router: every sample routed its own way
                    m.routing_weight.copy_(torch.randn(m.routing_weight.shape, generator=gr, device=dev) * 4.0
                                           / m.in_channels ** 0.5)

                def step(variant):
                    def run():
                        use(variant)
                        return timed(lambda: unet(x, timesteps=t, context=ctx))()
                    return run

                m0 = cond[paths[0]]
                r0 = m0.gates(seen[paths[0]])
                spread_rows = float((r0.max(0).values - r0.min(0).values).min()) if batch > 1 else 0.0
                ops = len(device_ops(m0, seen[paths[0]]))
                path = m0.batch_path(seen[paths[0]], r0)
                conv_fns = {"plain": timed(lambda: [plain[p](seen[p]) for p in paths], a.conv_reps),
                            "auto": timed(lambda: [cond[p](seen[p]) for p in paths], a.conv_reps)}

                def forced(mode):
                    def run_all():
                        for p in paths:
                            cond[p].batch_mode = mode
                        try:
                            return [cond[p](seen[p]) for p in paths]
                        finally:
                            for p in paths:
                                del cond[p].batch_mode
                    return run_all

                for mode in (MODES if batch > 1 else ()):
                    conv_fns[mode] = timed(forced(mode), a.conv_reps)

                def route_mix():  # the CondConv-only work, as the module does it for this batch
                    for p in paths:
                        m = cond[p]
                        r = m.gates(seen[p])
                        r = r[:1] if batch == 1 else r
                        torch.mm(r, m.weight.reshape(m.num_experts, -1)).to(dtype)
                        torch.mm(r, m.bias.to(r.dtype)).to(dtype)
                conv_fns["route"] = timed(route_mix, a.conv_reps)
                for fn in conv_fns.values():
                    fn()  # warm-up
                steps = {}
                if not a.skip_unet:
                    step_fns = {"plain": step(plain), "cond": step(cond)}
                    for fn in step_fns.values():
                        fn()  # warm-up (the cond variant now routed per sample)
                t0 = time.perf_counter()
                if not a.skip_unet:
                    steps = _device.steady_rounds(step_fns, a.reps, a.max_reps)
                convs = _device.steady_rounds(conv_fns, a.reps, a.max_reps)
                measure_s += time.perf_counter() - t0
                rows.append((batch, steps, convs, err, ops, path, spread_rows))
        use(plain)
        # the mix in the compute dtype equals the fp32 mix rounded once (fp32 accumulation) on this device
        m0 = cond[paths[0]]
        r = torch.rand(8, a.experts, device=dev).to(m0.weight.dtype)
        w = m0.weight.reshape(a.experts, -1)
        mix_exact = torch.equal(torch.mm(r, w), torch.mm(r.float(), w.float()).to(w.dtype))
        tables.append((dtype, rows, n_cond, mix_exact))

    setup_s = time.perf_counter() - T_START - measure_s
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"CondConv bench: tiny-sd structure, model_channels {a.channels}"
          + (" (full width)" if a.channels == 320 else " (REDUCED width)")
          + f", latent {a.size}x{a.size} ({a.size * 8} px), {where}, torch {torch.__version__}"
          + (", times: CPU time of the thread" if a.clock == "thread" else ""))
    print(f"CondConv K={a.experts} on {len(paths)} convs: {', '.join(paths)}")
    n_cond = tables[0][2]
    print(f"parameters: plain {n_plain / 1e6:.2f}M, with CondConv {n_cond / 1e6:.2f}M "
          f"({(n_cond / n_plain - 1) * 100:+.2f} %)")
    print()
    print("ms: best of the interleaved rounds (3 significant figures); ratio: CondConv / plain, median of per-round "
          "ratios; spread: (median - best) / best of the CondConv step; convs: the 6 swapped convs alone (auto: "
          "the path batch_mode 'auto' takes; per_sample / grouped / expert_sum forced); delta: (convs CondConv - "
          "convs plain) / step plain; ops: device ops of one CondConv call (plain conv: 1)")
    head = (f"| dtype | batch | step plain ms | step CondConv ms | step ratio | spread | convs plain ms | "
            f"convs CondConv ms (path) | convs ratio | {' | '.join(m + ' ms' for m in MODES)} | delta % of step | "
            f"routing+mix ms | ops/call | init max rel diff |")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for dtype, rows, _, _ in tables:
        dname = _device.dtype_name(dtype)
        for batch, steps, convs, err, ops, path, _ in rows:
            if steps:
                s_plain, s_cond = min(steps["plain"]), min(steps["cond"])
                step_cols = (f"{ms3(s_plain)} | {ms3(s_cond)} | {ratio(steps, 'cond', 'plain'):.3f} | "
                             f"{spread(steps['cond']) * 100:.1f} %")
                delta = f"{(min(convs['auto']) - min(convs['plain'])) / s_plain * 100:+.2f}"
            else:
                step_cols, delta = "- | - | - | -", "-"
            modes = " | ".join(ms3(min(convs[m])) if m in convs else "-" for m in MODES)
            print(f"| {dname} | {batch} | {step_cols} | {ms3(min(convs['plain']))} | {ms3(min(convs['auto']))} "
                  f"({path}) | {ratio(convs, 'auto', 'plain'):.3f} | {modes} | {delta} | {ms3(min(convs['route']))} | "
                  f"{ops} | {err:.2e} |")
    print()
    for dtype, rows, _, mix_exact in tables:
        low = min((s for b, *_, s in rows if b > 1), default=float("nan"))
        line = f"{_device.dtype_name(dtype)}: smallest gate spread across a batch's samples (timed rows): {low:.2e}"
        if dtype in (torch.float16, torch.bfloat16):
            line += f"; the half-precision kernel mix equals the fp32 mix rounded once: {'yes' if mix_exact else 'NO'}"
        print(line)
    print(_device.phase_line(setup_s, measure_s))
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
