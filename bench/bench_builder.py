# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: every student-builder preset against its teacher: parameters, estimated and measured per-step cost,
share of tensors from the teacher, block-map certainty.

A full-width random teacher is built as ComfyUI's own UNet; each preset's student is built from it by
``BuildStudentUNet``'s own function; teacher and student UNet steps are timed interleaved (median of
``--rounds``), batch 1 (CFG would double both). Defaults are the issue's resolutions (512 px for SD 1.x/2.x,
1024 px for SDXL) — on a CPU pass smaller ``--px-sd/--px-sdxl`` to finish in minutes.

    python bench/bench_builder.py [--families sd1,sd2,sdxl] [--px-sd 512] [--px-sdxl 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import _device
from _pack import import_pack, setup_comfy  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="sd1,sd2,sdxl")
    ap.add_argument("--px-sd", type=int, default=512)
    ap.add_argument("--px-sdxl", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA in fp16 when there, else CPU fp32)")
    a = ap.parse_args(argv)
    dev, dtype = _device.setup(a.device)
    setup_comfy()
    import_pack()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import comfy.model_management as mm
    import comfy.model_patcher
    from distilled_unets.models import structures as S
    from distilled_unets.models.cost import unet_cost
    from distilled_unets.nodes._glue import comfy_model
    from distilled_unets.nodes.students import build_student

    def timed(net, x, t, ctx, y):
        with torch.no_grad():
            _device.sync(dev)
            t0 = time.perf_counter()
            net(x, timesteps=t, context=ctx, y=y)
            _device.sync(dev)
        return time.perf_counter() - t0

    print(f"{_device.describe(dev, dtype)}; batch 1, median of {a.rounds} interleaved rounds")
    print(f"{'family':6} {'preset':11} {'px':>5} | {'params':>14} {'vs teacher':>10} | {'est. step':>9} "
          f"{'measured':>9} | {'from teacher':>12} {'certain':>8} {'choice':>7}")
    for fam in a.families.split(","):
        px = a.px_sdxl if fam == "sdxl" else a.px_sd
        lat = px // 8
        g = torch.Generator().manual_seed(0)
        teacher_t = S.TEACHERS[fam]
        model = comfy_model(teacher_t, dtype, None)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        teacher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
        x = torch.randn(1, 4, lat, lat, generator=g).to(dev, dtype)
        ts = torch.tensor([500.0], device=dev)
        ctx = torch.randn(1, 77, teacher_t.context_dim, generator=g).to(dev, dtype)
        y = torch.randn(1, 2816, generator=g).to(dev, dtype) if fam == "sdxl" else None
        tcost = unet_cost(teacher_t, lat, lat)
        base = None
        for name, preset in S.PRESETS.items():
            if fam not in preset.families:
                continue
            if preset.needs_base:
                if base is None:
                    base, _ = build_student(teacher, "bk-base")
                student, _ = build_student(teacher, name, base)
            else:
                student, _ = build_student(teacher, name)
            bm = student.get_attachment("distilled_unets.block_map")
            counts = bm.counts()
            n = sum(counts.get(o, 0) for o in ("teacher", "base", "new"))
            snet = student.model.diffusion_model.to(dev, dtype)
            tnet = teacher.model.diffusion_model.to(dev)
            for _ in range(1):  # warm-up
                timed(snet, x, ts, ctx, y)
                timed(tnet, x, ts, ctx, y)
            st, tt = [], []
            for _ in range(a.rounds):
                st.append(timed(snet, x, ts, ctx, y))
                tt.append(timed(tnet, x, ts, ctx, y))
            sc = unet_cost(bm.student, lat, lat)
            choice = "yes" if any(s.note.startswith("which teacher layers") for s in bm.units.values()) else "-"
            print(f"{fam:6} {name:11} {px:>5} | {sc.params:>14,} {sc.params / tcost.params:>10.2f} | "
                  f"{sc.macs / tcost.macs:>9.2f} {statistics.median(st) / statistics.median(tt):>9.2f} | "
                  f"{counts.get('teacher', 0) / n:>12.0%} {counts.get('certain', 0) / n:>8.0%} {choice:>7}")
            del student, snet
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del teacher, model, base
        mm.unload_all_models()
        gc.collect()
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
