# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: the distillation engine's training rate at 1 vs 2 processes (DDP over gloo on the CPU) and its per-GPU
rate (DDP over NCCL, one process per GPU), launched by torchrun exactly as ``tools/distill.py`` is.

What is measured: each worker is a torchrun process that starts the process group the trainer's way
(``tools/distill.py``'s ``init_distributed``), builds a random teacher and its bk-small student (Build Student
UNet's own function), and trains them with the engine (``Distiller``: teacher forward, student forward,
task + output KD + feature KD loss, backward with DDP's all-reduce, clip, AdamW, EMA) on random latents and
captions held in memory (dataset streaming is not in these numbers). Samples/s = samples of all processes over
the wall time of the measured steps (after ``--warmup`` steps), the best of ``--reps`` alternated runs (the
least disturbed on a shared machine). Also the samples per CPU-second of a process (its CPU time over the
measured steps; the busiest process with two): the work DDP adds, insensitive to other programs on the cores.

CPU (tiny widths): 1 process on 1 core vs 2 processes on 2 cores, each process pinned to its own core with one
torch thread, at equal per-process batch. Perfect scaling doubles the samples/s; the DDP overhead is
``1 - rate(2) / (2 x rate(1))``, what the gradient all-reduce and the per-step loss all-reduce cost (goal
<= 10 %). On a machine whose cores are busy with other work, the overhead figure includes that contention.

GPU: full-width SD 1.5 teacher and BK-SDM-Small student at 512 px (64x64 latents), the engine's default
precision (bf16 autocast), one process per visible GPU (``--gpus``); the per-GPU rate is the global rate over
the number of GPUs (goal of the GPU issue: 60 samples/s for bk-small at 512 px on one H100).

    python bench/bench_distill_scale.py                       # CPU part; GPU part when CUDA is there
    python bench/bench_distill_scale.py --parts cpu --reps 3 --batch 8 --size 16
    python bench/bench_distill_scale.py --parts gpu --gpus 8 --gpu-batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))

GPU_GOAL = 60.0  # samples/s, bk-small at 512 px on one H100 (the GPU issue)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# the worker (one torchrun process)


def worker(a) -> int:
    import torch
    import torch.distributed as dist
    from _pack import import_pack

    import_pack()  # the host-free parts (ComfyUI comes once this rank's device is chosen)
    from distilled_unets.models.students.distill.launch import end_process_group, init_distributed

    dev_flag = "cuda" if a.part == "gpu" else "cpu"
    rank, world, device = init_distributed(dev_flag)  # the trainer's process-group start
    local = int(os.environ.get("LOCAL_RANK", "0"))
    t0 = time.perf_counter()
    if a.part == "cpu":
        if a.pin and hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[local % len(cores)]})
        torch.set_num_threads(a.threads)
    os.environ["BENCH_DEVICE"] = str(device)
    from _pack import setup_comfy

    setup_comfy()
    import dataclasses

    import _device
    import comfy.model_patcher
    from distilled_unets.models.structure import structures as S
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes.host.distill import block_map_for, student_unet_for_training
    from distilled_unets.nodes.host.students import build_student
    from distilled_unets.nodes.host.unet import comfy_model, topology_of

    torch.manual_seed(0)
    tt = S.TEACHERS["sd1"] if a.part == "gpu" else dataclasses.replace(S.TEACHERS["sd1"], model_channels=a.width)
    model = comfy_model(tt, torch.float32, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    teacher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    student, _ = build_student(teacher, "bk-small")
    st = topology_of(student)
    bm, _ = block_map_for(student, tt, st)
    trainable, _ = D.trainable_filter(bm, "all")
    t_dtype = torch.float32
    if device.type == "cuda":  # the teacher in half precision on the GPU, as ComfyUI loads it for training
        t_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        _device.cast_unet(teacher, t_dtype)
        teacher.model.diffusion_model.to(device)
    lat = a.gpu_size if a.part == "gpu" else a.size
    batch = a.gpu_batch if a.part == "gpu" else a.batch
    steps = a.gpu_steps if a.part == "gpu" else a.steps
    n = batch * world * 4
    data = D.KDData(torch.randn(n, 4, lat, lat, generator=g), torch.randn(n, 77, tt.context_dim, generator=g))
    cfg = D.DistillConfig(steps=a.warmup + steps, batch_size=batch, learning_rate=5e-5, seed=0,
                          gradient_checkpointing=a.gpu_checkpointing and a.part == "gpu")
    d = D.Distiller(teacher=teacher.model.diffusion_model, student=student_unet_for_training(student, st),
                    teacher_topology=tt,
                    student_topology=st, schedule=D.NoiseSchedule(teacher.get_model_object("model_sampling")),
                    data=data, config=cfg, trainable=trainable, device=device, teacher_dtype=t_dtype,
                    node="bench_distill_scale")
    stamps = {}

    def on_step(step, terms, applied):  # the engine reads the loss back every step: the device is done
        stamps[step] = (time.perf_counter(), time.process_time())

    result = {"world": world, "batch": batch, "latent": lat, "device": _device.describe(device, t_dtype)}
    try:
        if device.type == "cuda":
            d.check_memory()
        d.run(on_step=on_step)
        (w0, c0), (w1, c1) = stamps[a.warmup], stamps[a.warmup + steps]
        cpu = torch.tensor([c1 - c0], dtype=torch.float64)
        if dist.is_initialized() and device.type == "cpu":  # the busiest process
            dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
        result.update(rate=steps * batch * world / (w1 - w0), cpu_rate=steps * batch / float(cpu), setup=w0 - t0,
                      measure=w1 - w0, precision=str(d.autocast or "fp32"),
                      peak_mib=_device.process_peak_mib(device))
    except D.TrainingMemoryError as e:
        result.update(error=str(e), setup=time.perf_counter() - t0, measure=0.0, peak_mib=0.0)
    if rank == 0:
        Path(a.result).write_text(json.dumps(result))
    end_process_group(True)
    return 0


# ------------------------------------------------------------------------------------------------
# the parent: launches, tables


def launch(a, part: str, nproc: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = os.path.join(tmp, "result.json")
        argv = [a_ for a_ in sys.argv[1:] if a_ != "--worker"]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_port()}", str(Path(__file__).resolve()),
               "--worker", "--part", part, "--result", res, *argv]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), GLOO_SOCKET_IFNAME=os.environ.get(
            "GLOO_SOCKET_IFNAME", "lo"))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not os.path.exists(res):
            print(p.stdout[-3000:])
            raise SystemExit(f"the {part} run with {nproc} process(es) failed (exit {p.returncode})")
        out = json.loads(Path(res).read_text())
        out["wall"] = wall
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--parts", default="cpu,gpu", help="cpu, gpu or both (gpu only runs where CUDA is)")
    ap.add_argument("--reps", type=int, default=2, help="alternated runs per process count; the best is kept")
    ap.add_argument("--batch", type=int, default=8, help="CPU: samples per process per step")
    ap.add_argument("--size", type=int, default=16, help="CPU: latent size (16 = 128 px)")
    ap.add_argument("--width", type=int, default=32, help="CPU: model channels of the tiny SD 1.5 teacher")
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per process")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="CPU: do not pin each process to a core")
    ap.add_argument("--gpus", type=int, default=0, help="GPU: processes (0 = every visible GPU)")
    ap.add_argument("--gpu-batch", type=int, default=16, help="GPU: samples per GPU per step")
    ap.add_argument("--gpu-size", type=int, default=64, help="GPU: latent size (64 = 512 px)")
    ap.add_argument("--gpu-steps", type=int, default=20, help="GPU: measured steps")
    ap.add_argument("--gpu-checkpointing", action="store_true", help="GPU: gradient checkpointing")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)

    import torch

    parts = a.parts.split(",")
    setup = measure = 0.0
    peak = 0.0
    if "cpu" in parts:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        runs = {1: [], 2: []}
        for _ in range(a.reps):
            for nproc in (1, 2):
                r = launch(a, "cpu", nproc, a.timeout)
                runs[nproc].append(r)
                setup += r["wall"] - r["measure"]
                measure += r["measure"]
                peak = max(peak, r["peak_mib"])
        best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
        r1, r2 = best[1]["rate"], best[2]["rate"]
        print(f"CPU: {best[1]['device']}; tiny SD 1.5 teacher (width {a.width}) -> bk-small, "
              f"{a.size * 8} px, batch {a.batch} per process, {a.threads} thread(s) per process"
              f"{', each process pinned to its own core' if a.pin else ''}, {cores} core(s) visible; "
              f"best of {a.reps}, {a.steps} steps after {a.warmup}")
        print(f"{'processes':>9} | {'global batch':>12} | {'samples/s':>9} | {'all runs':>16} | {'vs 1 process':>12} | "
              f"{'samples per CPU-second of a process':>35}")
        for k in (1, 2):
            allr = ", ".join(f"{r['rate']:.1f}" for r in runs[k])
            print(f"{k:>9} | {a.batch * k:>12} | {best[k]['rate']:>9.1f} | {allr:>16} | "
                  f"{best[k]['rate'] / r1:>11.2f}x | {max(r['cpu_rate'] for r in runs[k]):>35.2f}")
        overhead = 1 - r2 / (2 * r1)
        c1, c2 = (max(r["cpu_rate"] for r in runs[k]) for k in (1, 2))
        print(f"DDP overhead at equal per-process batch: {100 * overhead:.1f} % of wall-clock samples/s (goal <= 10 %; "
              f"0 % = 2 processes do twice the samples/s of one); {100 * (1 - c2 / c1):.1f} % more CPU time per "
              "sample in a process (the all-reduces' work, whatever else runs on the cores)")
    if "gpu" in parts:
        if not torch.cuda.is_available():
            print("GPU: not available")
        else:
            nproc = a.gpus or torch.cuda.device_count()
            r = launch(a, "gpu", nproc, a.timeout)
            setup += r["wall"] - r["measure"]
            measure += r["measure"]
            peak = max(peak, r["peak_mib"])
            if "error" in r:
                print(f"GPU: {r['device']}: {r['error']}")
            else:
                per = r["rate"] / nproc
                print(f"GPU: {r['device']}; SD 1.5 teacher -> bk-small (full width), {r['latent'] * 8} px, batch "
                      f"{r['batch']} per GPU, {nproc} GPU(s), autocast {r['precision']}"
                      f"{', gradient checkpointing' if a.gpu_checkpointing else ''}; {a.gpu_steps} steps after "
                      f"{a.warmup}")
                print(f"  {r['rate']:.1f} samples/s in all, {per:.1f} samples/s per GPU (goal {GPU_GOAL:.0f} per "
                      f"H100: {per / GPU_GOAL:.2f}x)")
    print(f"bench phases: setup {setup:.1f} s, measure {measure:.1f} s")
    print(f"bench peak memory: {peak:.0f} MiB (the largest worker: torch.cuda.max_memory_allocated on a GPU, max "
          "RSS on the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
