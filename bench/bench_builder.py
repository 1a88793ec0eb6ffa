# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: every student-builder preset against its teacher: parameters, estimated and measured per-step cost,
share of tensors from the teacher, block-map certainty.

Each student is the structure ``BuildStudentUNet`` plans for the preset (``models.students.builder.plan``: topology and
block map, A-SDM presets combined with a bk-base student of the same teacher), built as ComfyUI's own UNet
directly on the device and drawn there with random weights, once; so is the full-width teacher (once per
family). The step time does not depend on the weights' values; that the builder copies the right tensors is
the tests' business (tests/unit/test_builder_plan.py, tests/comfy/test_builder.py). Teacher and student UNet
steps (batch 1; CFG would double both) are warmed up, then timed interleaved: ``--rounds`` rounds, and more
(up to ``--max-rounds``) while a row's spread ((median - best) / best) is above 5 %. Defaults are the issue's
resolutions (512 px for SD 1.x/2.x, 1024 px for SDXL): on a CPU pass smaller ``--px-sd/--px-sdxl``.

    python bench/bench_builder.py [--families sd1,sd2,sdxl] [--px-sd 512] [--px-sdxl 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import _device
from _pack import import_pack, random_unet, setup_comfy  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="sd1,sd2,sdxl")
    ap.add_argument("--presets", default="", help="comma-separated presets (default: all of each family)")
    ap.add_argument("--px-sd", type=int, default=512)
    ap.add_argument("--px-sdxl", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=0, help="bound on the rounds (default 3 x --rounds)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each UNet before the clock")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA in fp16 when there, else CPU fp32)")
    a = ap.parse_args(argv)
    ph = _device.Phases()
    dev, dtype = _device.setup(a.device)
    setup_comfy()
    import_pack()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from distilled_unets.models.structure import structures as S
    from distilled_unets.models.structure.cost import unet_cost
    from distilled_unets.models.students import builder

    wanted = [p for p in a.presets.split(",") if p]
    max_rounds = a.max_rounds or 3 * a.rounds

    def timed(net, x, t, ctx, y):
        def call():
            with torch.no_grad():
                _device.sync(dev)
                t0 = time.perf_counter()
                net(x, timesteps=t, context=ctx, y=y)
                _device.sync(dev)
            return time.perf_counter() - t0
        return call

    print(f"{_device.describe(dev, dtype)}; batch 1, median of {a.rounds}-{max_rounds} interleaved rounds "
          f"(more while a row's spread is above {_device.SPREAD_GOAL:.0%}), after {a.warmup} warm-up call(s)")
    print(f"{'family':6} {'preset':11} {'px':>5} | {'params':>14} {'vs teacher':>10} | {'teacher ms':>10} "
          f"{'student ms':>10} {'spread':>6} {'rounds':>6} | {'est. step':>9} {'measured':>9} | "
          f"{'from teacher':>12} {'certain':>8} {'choice':>7}")
    seed = 0
    for fam in a.families.split(","):
        px = a.px_sdxl if fam == "sdxl" else a.px_sd
        lat = px // 8
        g = torch.Generator(device=dev).manual_seed(0)
        teacher_t = S.TEACHERS[fam]
        tnet = random_unet(teacher_t, dtype, dev, seed).diffusion_model
        seed += 1
        x = torch.randn(1, 4, lat, lat, generator=g, device=dev, dtype=dtype)
        ts = torch.tensor([500.0], device=dev)
        ctx = torch.randn(1, 77, teacher_t.context_dim, generator=g, device=dev, dtype=dtype)
        y = torch.randn(1, teacher_t.adm_in_channels, generator=g, device=dev, dtype=dtype) \
            if teacher_t.adm_in_channels else None
        tcost = unet_cost(teacher_t, lat, lat)
        teacher_call = timed(tnet, x, ts, ctx, y)
        base_t = None
        for name, preset in S.PRESETS.items():
            if fam not in preset.families or (wanted and name not in wanted):
                continue
            if preset.needs_base and base_t is None:
                base_t = builder.plan("bk-base", teacher_t).student
            p = builder.plan(name, teacher_t, base_t if preset.needs_base else None)
            snet = random_unet(p.student, dtype, dev, seed).diffusion_model
            seed += 1
            student_call = timed(snet, x, ts, ctx, y)
            for _ in range(a.warmup):
                student_call()
                teacher_call()
            ph.measuring()
            times = _device.steady_rounds({"student": student_call, "teacher": teacher_call}, a.rounds, max_rounds)
            ph.setting_up()
            st, tt = statistics.median(times["student"]), statistics.median(times["teacher"])
            spread = max(_device.spread(v) for v in times.values())
            counts = p.block_map.counts()
            n = sum(counts.get(o, 0) for o in ("teacher", "base", "new"))
            sc = unet_cost(p.student, lat, lat)
            choice = "yes" if any(s.note.startswith("which teacher layers") for s in p.block_map.units.values()) \
                else "-"
            print(f"{fam:6} {name:11} {px:>5} | {sc.params:>14,} {sc.params / tcost.params:>10.2f} | "
                  f"{_device.ms3(tt):>10} {_device.ms3(st):>10} {spread:>6.1%} {len(times['student']):>6} | "
                  f"{sc.macs / tcost.macs:>9.2f} {st / tt:>9.2f} | "
                  f"{counts.get('teacher', 0) / n:>12.0%} {counts.get('certain', 0) / n:>8.0%} {choice:>7}",
                  flush=True)
            del snet, student_call
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del tnet, teacher_call
        gc.collect()
    print(ph.line())
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
