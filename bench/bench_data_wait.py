# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: how long a distillation step waits for its data when the data are streamed from disk, as a share of the
step (goal <= 2 % at batch 64), with the readers side by side in one run:

* ``whole shards``: the reader the engine had before (every batch parses the shards its samples are in, whole,
  through a cache of ``--open`` parsed shards), read in the step loop;
* ``index``: the sample index (each sample's bytes read where they lie in its shard), read in the step loop
  (``--prefetch 0``);
* ``index + prefetch``: the same read ahead by the engine's background thread (``--prefetch 2``, the default).

What runs: a SaveTrainingDataset-format folder written into a temporary folder (SD 1.5's shapes: a [1, 4, S, S]
latent, a [1, 77, 768] CLIP conditioning with its [1, 768] pooled output per sample, ``--shard-size`` samples per
shard, fp32 as CLIP Text Encode gives them on a CPU), a random SD 1.5 teacher and its bk-small student (Build
Student UNet's own function) trained by the engine (``Distiller``: teacher forward, student forward, the KD loss,
backward, clip, AdamW, EMA) at ``--batch`` samples per step, streaming the folder through
``ShardedDataset`` with the teacher's own sample preparation (``prepare_sample``), as Distill Student UNet and
``tools/distill.py`` do. Before each variant the folder's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``), so its reads come from the disk.

Reported per variant: the median step time after ``--warmup`` steps, the median wait per step (the engine's
``data_waits``: the time the step loop spent getting its micro-batch and queueing its copies to the device), the
wait as a share of the measured steps' time, and the reader alone: seconds to read and prepare one batch from a
cold page cache (so its samples/s can be set against a GPU's step rate).

    python bench/bench_data_wait.py --device cpu          # CPU: tiny widths (32 channels), 128 px, batch 64
    python bench/bench_data_wait.py --device cuda --width 320 --size 64 --checkpointing --samples 2100 --steps 3
                                                           # GPU: full-width bk-small, 512 px, batch 64

What the figure means: the wait is the reading and preparing the step loop does itself (or, with prefetch, the
hand-over from the reading thread), so its share depends on how long the step takes. Here a tiny-width step takes
about 2-3 s on one CPU core at batch 64; a full-width bk-small step at 512 px and batch 64 on one H100 would take
about 0.4-1.1 s by the pack's cost model (2.3 TFLOP per sample at 60-170 samples/s; not measured), so a GPU would
see a 2-7x larger share of the same reading when it is not hidden. What transfers directly is the reader's own
rate ("reader samples/s", one batch from a cold page cache), to set against the GPU's samples/s: read ahead, the
wait stays near zero while the reader is faster than the step. On a 2-core CPU the reading thread also competes
with the step for the cores, which a GPU step does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import _device
from _pack import import_pack, setup_comfy  # noqa: E402

GOAL = 0.02  # the wait's share of the step (issue 24)
VARIANTS = (("whole shards", False, 0), ("index", True, 0), ("index + prefetch", True, 2))


def write_dataset(folder: str, n: int, size: int, shard_size: int, seed: int = 0) -> int:
    """``n`` samples in SaveTrainingDataset's layout (ComfyUI 0.33's writer: ``torch.save`` of the lists per
    shard, then metadata.json), fsynced; returns the bytes written."""
    import json

    import torch

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    total = 0
    for s in range(0, n, shard_size):
        k = min(shard_size, n - s)
        shard = {"latents": [{"samples": torch.randn(1, 4, size, size, generator=g)} for _ in range(k)],
                 "conditioning": [[[torch.randn(1, 77, 768, generator=g),
                                    {"pooled_output": torch.randn(1, 768, generator=g)}]] for _ in range(k)]}
        path = os.path.join(folder, f"shard_{s // shard_size:04d}.pkl")
        with open(path, "wb") as f:
            torch.save(shard, f)
            f.flush()
            os.fsync(f.fileno())
        total += os.path.getsize(path)
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump({"num_samples": n, "num_shards": (n + shard_size - 1) // shard_size, "shard_size": shard_size}, f)
    return total


def drop_cache(folder: str) -> bool:
    """Drop the folder's files from the page cache (``_device.drop_page_cache``)."""
    return _device.drop_page_cache([os.path.join(folder, name) for name in os.listdir(folder)])


class Models:
    """A random SD 1.5 teacher of width ``--width`` and its bk-small student, built and drawn on the device."""

    def __init__(self, a, device):
        import dataclasses

        import comfy.model_patcher
        import torch
        from _pack import random_unet
        from distilled_unets.models.structure import structures as S
        from distilled_unets.models.students.distill import trainable_filter
        from distilled_unets.nodes.host.distill import block_map_for, student_unet_for_training
        from distilled_unets.nodes.host.students import build_student
        from distilled_unets.nodes.host.unet import topology_of

        self.tt = dataclasses.replace(S.TEACHERS["sd1"], model_channels=a.width)
        model = random_unet(self.tt, torch.float32, device, seed=0)
        self.teacher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                        offload_device=torch.device("cpu"))
        student, _ = build_student(self.teacher, "bk-small")
        self.st = topology_of(student)
        bm, _ = block_map_for(student, self.tt, self.st)
        self.trainable, _ = trainable_filter(bm, "all")
        self.student = student_unet_for_training(student, self.st)
        self.t_dtype = torch.float32
        if device.type == "cuda":  # the teacher in half precision on the GPU, as ComfyUI loads it for training
            self.t_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            _device.cast_unet(self.teacher, self.t_dtype)


def run_variant(a, m: Models, folder: str, device, index: bool, prefetch: int) -> dict:
    import functools

    import torch
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.distill.datasets import ShardedDataset
    from distilled_unets.nodes.host.samples import prepare_sample

    prepare = functools.partial(prepare_sample, m.teacher.model)
    cold = drop_cache(folder)
    data = ShardedDataset(folder, prepare, max_open=a.open, index=index)
    # the reader alone, from a cold page cache: one batch of the run's own first draw
    cold = drop_cache(folder) and cold
    d0 = D.Distiller(teacher=m.teacher.model.diffusion_model, student=m.student, teacher_topology=m.tt,
                     student_topology=m.st, schedule=D.NoiseSchedule(m.teacher.get_model_object("model_sampling")),
                     data=data, config=D.DistillConfig(steps=1, batch_size=a.batch, seed=1), device=device,
                     node="bench_data_wait")
    t0 = time.perf_counter()
    d0.host_batch(a.warmup + a.steps + 1, 0)  # a batch the run below does not draw
    read_s = time.perf_counter() - t0
    data.close()
    drop_cache(folder)
    cfg = D.DistillConfig(steps=a.warmup + a.steps, batch_size=a.batch, learning_rate=5e-5, seed=1,
                          gradient_checkpointing=a.checkpointing, ema_decay=0.9999)
    d = D.Distiller(teacher=m.teacher.model.diffusion_model, student=m.student, teacher_topology=m.tt,
                    student_topology=m.st, schedule=D.NoiseSchedule(m.teacher.get_model_object("model_sampling")),
                    data=data, config=cfg, trainable=m.trainable, device=device, teacher_dtype=m.t_dtype,
                    node="bench_data_wait", prefetch=prefetch)
    stamps = []
    _device.sync(device)
    t_run = time.perf_counter()
    res = d.run(on_step=lambda step, terms, applied: stamps.append(time.perf_counter()))
    steps = [b - a_ for a_, b in zip([t_run] + stamps[:-1], stamps)]
    data.close()
    waits = d.data_waits
    meas_steps, meas_waits = steps[a.warmup:], waits[a.warmup:]
    out = {"step": statistics.median(meas_steps), "wait": statistics.median(meas_waits),
           "share": sum(meas_waits) / sum(meas_steps), "first_wait": waits[0], "read": read_s, "cold": cold,
           "measure": sum(meas_steps), "losses": res.losses}
    del d, d0, res
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="samples per step")
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px; 64 = 512 px)")
    ap.add_argument("--width", type=int, default=32, help="model channels of the SD 1.5 teacher (320 = full)")
    ap.add_argument("--samples", type=int, default=3000, help="samples in the dataset")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (Save Training Dataset's default)")
    ap.add_argument("--open", type=int, default=2, help="shard files open at once (the engine's default: 2)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    ap.add_argument("--reps", type=int, default=1, help="rounds over the variants (interleaved)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (batch 64 at 512 px on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (the reading thread needs a core too)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: BENCH_DEVICE, else CUDA when there is one)")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help=f"comma-separated, of: {', '.join(v[0] for v in VARIANTS)}")
    a = ap.parse_args(argv)
    ph = _device.Phases()
    device, _ = _device.setup(a.device)
    setup_comfy()
    import_pack()
    import torch

    torch.set_num_threads(a.threads)
    dev = torch.device(device)
    chosen = [v for v in VARIANTS if v[0] in a.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="distilled_unets_bench_") as tmp:
        folder = os.path.join(tmp, "dataset")
        t0 = time.perf_counter()
        nbytes = write_dataset(folder, a.samples, a.size, a.shard_size)
        wrote = time.perf_counter() - t0
        m = Models(a, dev)
        results: dict = {v[0]: [] for v in chosen}
        ph.measuring()
        for _ in range(a.reps):
            for name, index, prefetch in chosen:
                r = run_variant(a, m, folder, dev, index, prefetch)
                results[name].append(r)
        ph.setting_up()
    per_sample = nbytes / a.samples
    print(f"\nData wait while distilling from a streamed dataset: {_device.describe(dev, m.t_dtype)}; SD 1.5 teacher "
          f"(width {a.width}) -> bk-small, {a.size * 8} px (latent {a.size}x{a.size}), batch {a.batch}"
          f"{', gradient checkpointing' if a.checkpointing else ''}; dataset {a.samples} samples in "
          f"{(a.samples + a.shard_size - 1) // a.shard_size} shards of {a.shard_size} ({nbytes / 2 ** 20:.0f} MiB, "
          f"{per_sample / 1024:.0f} KiB per sample, written in {wrote:.1f} s), at most {a.open} shard(s) open; "
          f"{a.steps} steps after {a.warmup}, {a.reps} round(s); page cache dropped before each variant: "
          f"{'yes' if all(r['cold'] for rs in results.values() for r in rs) else 'no (no posix_fadvise here)'}")
    print(f"{'reader':>17} | {'ms/step':>8} | {'wait ms/step':>12} | {'wait share':>10} | {'1st step wait ms':>16} | "
          f"{'one batch cold, s':>17} | {'reader samples/s':>16}")
    ref = None
    for name, _, _ in chosen:
        rs = results[name]
        share = sum(r["share"] * r["measure"] for r in rs) / sum(r["measure"] for r in rs)
        read = min(r["read"] for r in rs)
        print(f"{name:>17} | {_device.ms3(statistics.median(r['step'] for r in rs)):>8} | "
              f"{_device.ms3(statistics.median(r['wait'] for r in rs)):>12} | {share:>9.2%} | "
              f"{_device.ms3(min(r['first_wait'] for r in rs)):>16} | {read:>17.3f} | {a.batch / read:>16.0f}")
        ref = ref or rs[0]["losses"]
        if rs[0]["losses"] != ref:
            print(f"  note: {name} drew other losses than {chosen[0][0]} (it must not): {rs[0]['losses'][:3]}")
    print(f"goal: the wait <= {GOAL:.0%} of the step at batch 64, streaming from disk; every reader draws the same "
          "samples (the losses of every variant are checked equal)")
    print(ph.line())
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
