"""Distil a student UNet from its teacher without a ComfyUI server: the engine of ``DistillStudentUNet``
(``models/students/distill/``, set up from ComfyUI MODELs by ``nodes/host/distill.py``) on ComfyUI's own UNet,
one process or many under ``torchrun``. This script holds the command line and the processes.

One process (one GPU, or the CPU):

    python tools/distill.py --teacher sd15.safetensors --preset bk-small --data models/datasets/my_set \\
        --out runs/bk-small --steps 50000 --batch-size 64 --gradient-accumulation 4 --tensorboard runs/tb

Many processes: the same command under PyTorch's launcher (DistributedDataParallel over torch.distributed,
NCCL on GPUs, gloo on CPUs; ``--batch-size`` is per process, the global batch is batch x processes):

    torchrun --nproc_per_node=8 tools/distill.py ...                                   # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 tools/distill.py ...

Inputs: ``--teacher`` a checkpoint or UNet file (safetensors, or weights-only .ckpt/.pt); ``--student`` a UNet
file (e.g. from Save Student UNet) or ``--preset`` to build one from the teacher as Build Student UNet does;
``--data`` a folder written by ComfyUI's Save Training Dataset (shards streamed, each rank reads only the shards
of its own samples); ``--vgg16`` torchvision VGG16 weights for A-SDM's VGG term. Same seed and global batch give
the same run at any number of processes.

One run per ``--out`` (rank 0 writes; the folder must be visible to every node):

* ``run.json``: the settings that make this run (teacher, student, data content, global batch, lr, ...). A run
  whose settings differ from what ``--out`` holds (run.json, or a checkpoint, student or losses.csv of an older
  run) is refused with the differences named; ``--out`` naming a file is refused (exit 2).
* ``checkpoint_NNNNNNN.safetensors`` every ``--checkpoint-every`` steps and when stopped; only the newest
  ``--keep-checkpoints`` are kept (an older one is deleted once a newer one is completely written). At start
  the trainer logs what one checkpoint weighs, what the run will hold at most and the free space, and refuses
  (exit 2) when it cannot fit.
* ``losses.csv`` (step, loss, its terms, skipped) and ``eval.csv`` (step, metrics); on resume both are rewritten
  from the checkpoint's history, so they hold exactly the steps of the weights trained so far.
* ``student-NNNNN.safetensors`` (NNNNN = steps trained) at the end: the EMA weights (or the raw ones with
  ``--ema-decay 0``) in the file format ``Load Distilled UNet`` reads, with the recipe, block map and this run's
  settings in the metadata; ``student-best.safetensors``: with ``--best-metric``, the weights of the best
  evaluation so far (replaced atomically when one improves; never counted in ``--keep-checkpoints``).
* ``dataset_digests.json``: the content digest of every shard (hashed once, trusted while a shard's size and
  modification time are unchanged); checkpoints record them, so a resume on edited data names the shard.

Evaluation: with held-out data (``--heldout-data``), the held-out output-KD error (``heldout_kd``) before the
first step, every ``--eval-every`` steps (0: at the start and the end only) and after the last step, with the
EMA weights; ``--tensorboard DIR`` also writes the loss, its terms, samples/s, learning rate, skipped steps and
every metric as TensorBoard scalars (rank 0; needs ``pip install tensorboard``).

Resume: ``--resume auto`` (the default) continues from the latest checkpoint in ``--out`` (the run is the same,
run.json says so), starts fresh when there is none, and does nothing when this run's student is already there.
So a job restarted by ``torchrun --max-restarts=N`` or by a scheduler picks up where it was with the same command.
``--resume DIR|FILE`` continues from the latest checkpoint in DIR (or that file) even if settings or data changed
(they are reported); ``--resume none`` starts afresh and only into a folder that holds no run.

Ctrl-C (or SIGTERM) stops after the current step on every rank, writes a checkpoint and exits with 130; a second
Ctrl-C stops at once. Exit codes: 0 done, 2 bad input (the message names the flag or file and the fix),
3 stopped by non-finite steps (several in a row; the last good checkpoint is named), 130 stopped by a signal,
1 anything else.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostError, import_pack, setup_comfy  # noqa: E402

log = logging.getLogger("distilled_unets")

NODE = "tools/distill.py"
TRAIN_CHOICES = {"all": "all", "student-blocks": "student blocks only", "changed-blocks": "changed blocks only"}
FEATURES = ("stages", "stages+mid", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
WEIGHT_DTYPES = ("default", "fp32", "fp16", "bf16")
CHECKPOINT_PREFIX = "checkpoint"
#: the engine's input names -> this script's flags (for error messages)
FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "gradient_accumulation": "--gradient-accumulation",
         "grad_accum": "--gradient-accumulation", "learning_rate": "--lr", "lr": "--lr",
         "loss_weights": "--loss-weights", "ema_decay": "--ema-decay", "feature_points": "--features",
         "precision": "--precision", "checkpoint_every": "--checkpoint-every", "train": "--train",
         "resume": "--resume", "resume_from": "--resume", "latents": "--data", "conditioning": "--data",
         "teacher": "--teacher", "student": "--student", "preset": "--preset", "vgg16": "--vgg16",
         "max_nonfinite_steps": "--max-nonfinite-steps", "keep_checkpoints": "--keep-checkpoints",
         "eval_every": "--eval-every", "best_metric": "--best-metric", "out": "--out", "save_dtype": "--save-dtype",
         "vae": "--vae", "clip_vision": "--clip-vision",
         "heldout_fraction": "--heldout-fraction", "ema_every": "--ema-every"}
EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SIGNAL = 0, 1, 2, 3, 130
TENSORBOARD_HINT = "--tensorboard needs TensorBoard: pip install tensorboard (into the Python that runs this script)"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="tools/distill.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Distil a student UNet from its teacher (BK-SDM / A-SDM knowledge distillation) on ComfyUI's "
                    "own UNet, headless; under torchrun on many GPUs and machines. See the module docstring.")
    m = ap.add_argument_group("models")
    m.add_argument("--teacher", required=True, help="the teacher: a checkpoint or UNet file")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", help="the student: a UNet file (e.g. from Save Student UNet)")
    src.add_argument("--preset", help="build the student from the teacher as Build Student UNet does (bk-base, "
                                      "bk-small, bk-tiny, ssd-1b, vega, koala-700m, koala-1b, asdm-m1, asdm-m2)")
    m.add_argument("--base-student", help="for --preset asdm-m1/asdm-m2: the distilled BK-Base-structured student")
    m.add_argument("--condconv-experts", type=int, default=0, help="for --preset: A-SDM CondConv experts (0 = off)")
    m.add_argument("--teacher-dtype", choices=WEIGHT_DTYPES, default="default",
                   help="the teacher's weight dtype (default: ComfyUI's choice for the device)")
    d = ap.add_argument_group("data and evaluation")
    d.add_argument("--data", required=True, help="a folder written by ComfyUI's Save Training Dataset")
    d.add_argument("--heldout-data", help="another such folder: the held-out output-KD error (heldout_kd) is "
                                          "measured on it")
    d.add_argument("--eval-every", "--heldout-every", dest="eval_every", type=int, default=0,
                   help="evaluate every N steps (0: before the first and after the last step only)")
    d.add_argument("--best-metric", default="", help="keep the weights of the best evaluation by this metric as "
                                                     "student-best.safetensors (heldout_kd; with --vae psnr, ssim, "
                                                     "ms_ssim; with --clip-vision too clip_image_cosine, fd_clip, "
                                                     "kid_clip, cmmd)")
    d.add_argument("--vae", help="the teacher's VAE (an SD 1.x/2.x/SDXL VAE file, a TAESD, or the teacher's full "
                                 "checkpoint): every evaluation "
                                 "then samples the held-out captions with teacher and student from the same noise, "
                                 "decodes them and judges the images (psnr, ssim, ms_ssim)")
    d.add_argument("--clip-vision", help="with --vae, a CLIP vision file (ViT-L/14, ViT-H/14, ViT-bigG/14): the CLIP "
                                         "metrics of those images too")
    d.add_argument("--eval-sampling-steps", type=int, default=8, help="Euler steps of the held-out images")
    d.add_argument("--heldout-fraction", type=float, default=None,
                   help="hold this fraction of --data out of training (at most 128 samples, chosen by a fixed "
                        "seed, the same at any number of processes) and measure the held-out error on it; default "
                        "0.01, or 0 with --heldout-data")
    d.add_argument("--prefetch", type=int, default=2,
                   help="micro-batches read ahead by a background thread while a step runs (0 = read in the loop)")
    d.add_argument("--open-shards", type=int, default=2, help="shard files open at once per process")
    t = ap.add_argument_group("training")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps (BK-SDM: 50,000 at batch 256)")
    t.add_argument("--batch-size", type=int, default=1, help="samples per forward pass, per process")
    t.add_argument("--gradient-accumulation", type=int, default=1,
                   help="forward passes per optimizer step (global batch = batch x processes x this)")
    t.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant (BK-SDM 5e-5)")
    t.add_argument("--loss-weights", default="bk-sdm",
                   help="bk-sdm (1/1/1), segmind (1/0.5/0.5), or TASK,OUT,FEAT[,MID[,VGG]] weights")
    t.add_argument("--features", choices=FEATURES, default="stages", help="feature KD points")
    t.add_argument("--train", choices=list(TRAIN_CHOICES), default="all",
                   help="which student weights train (student-blocks: A-SDM incubation)")
    t.add_argument("--vgg16", help="torchvision VGG16 weights (.safetensors or weights-only .pth): A-SDM's VGG term")
    t.add_argument("--seed", type=int, default=0, help="seeds sample order, timesteps and noise of every step")
    t.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the trained weights (0 = off)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--selective-recompute", action="store_true",
                   help="without --gradient-checkpointing: keep the convolution, matmul and attention outputs and "
                        "recompute only the element-wise ops in backward (about a third less activation memory; "
                        "the same loss and weights)")
    t.add_argument("--ema-on-host", action="store_true",
                   help="keep the EMA in host memory, updated by a host thread (on a GPU: 4 bytes per trained "
                        "parameter off the device)")
    t.add_argument("--ema-every", type=int, default=1,
                   help="update the EMA every N steps with the product of their decays (1 = every step, exact)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast: auto = bf16 on a GPU (fp16 without bf16), fp32 on the CPU; master weights fp32")
    t.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="stop after this many steps in a row with a non-finite loss or gradient")
    o = ap.add_argument_group("output and resume")
    o.add_argument("--out", required=True, help="output folder of this run (checkpoints, logs, the student)")
    o.add_argument("--resume", default="auto",
                   help="auto: the latest checkpoint in --out of this same run; DIR or FILE: that one; none")
    o.add_argument("--checkpoint-every", type=int, default=500, help="write a checkpoint every N steps (0 = off)")
    o.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep the newest N checkpoints of the run (0 = all); the students are never deleted")
    o.add_argument("--save-dtype", choices=SAVE_DTYPES, default="fp32", help="dtype of the student files")
    o.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars there (rank 0)")
    r = ap.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when present (each rank on the GPU of its LOCAL_RANK), else the CPU")
    r.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    r.add_argument("--comfyui", help="the ComfyUI folder to use as a library (default: COMFYUI_PATH or ~/ComfyUI)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per 10 %% instead)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# processes


# ------------------------------------------------------------------------------------------------
# progress


class Progress:
    """On rank 0: a tqdm bar (step, ETA, loss, samples/s in all and per process over the last 20 steps), or a log
    line per 10 % without it; what the run records (``runs.RunLog``)."""

    def __init__(self, *, rank: int, world: int, start: int, total: int, samples_per_step: int, bar: bool):
        self.rank, self.world, self.total, self.per_step = rank, world, total, samples_per_step
        self.record = None
        self.times = deque([(start, time.perf_counter())], maxlen=21)
        self.rate = float("nan")
        self.last_metrics: dict = {}
        self.bar = None
        self._next_line = start
        if rank == 0 and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc="distil")

    def __call__(self, step: int, terms: dict, applied: bool):
        self.times.append((step, time.perf_counter()))
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        if len(self.times) > 2:  # the first step after the start includes warm-up: leave it out when we can
            (s0, t0) = self.times[1]
        if s1 > s0 and t1 > t0:
            self.rate = (s1 - s0) * self.per_step / (t1 - t0)
        if self.rank != 0:
            return
        if self.record is not None:
            self.record.step(step, terms, applied, self.rate)
        rates = f"{self.rate:.1f} samples/s ({self.rate / self.world:.1f} per process)"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {terms['loss']:.5f}, {rates}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step >= self._next_line or step == self.total:
            self._next_line = step + max(1, self.total // 10)
            eta = (self.total - step) * self.per_step / self.rate if self.rate > 0 else float("nan")
            log.info("step %d/%d  loss %.5f  %s  ETA %s", step, self.total, terms["loss"], rates,
                     time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")

    def evaluation(self, step: int, metrics: dict, is_best: bool):
        self.last_metrics = dict(metrics)
        if self.rank != 0:
            return
        if self.record is not None:
            self.record.evaluation(step, metrics)
        log.info("evaluation at step %d: %s%s", step, ", ".join(f"{k} {v:.5g}" for k, v in metrics.items()),
                 " (best so far)" if is_best else "")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.record is not None:
            self.record.close()


# ------------------------------------------------------------------------------------------------
# the run


def load_models(args):
    """(teacher MODEL, student MODEL, student description) as the pack's loader and builder make them."""
    from distilled_unets.nodes.host.students import build_student
    from distilled_unets.nodes.host.unet import load_distilled_unet, node_errors

    with node_errors("tools/distill.py", "teacher"):  # a file's errors name its flag
        teacher, _ = load_distilled_unet(args.teacher, args.teacher_dtype, disable_dynamic=True)
    if args.student:
        with node_errors(NODE, "student"):
            student, _ = load_distilled_unet(args.student, "fp32", disable_dynamic=True)
        return teacher, student, f"student file {os.path.basename(args.student)}"
    with node_errors(NODE, "--base-student"):
        base = load_distilled_unet(args.base_student, "fp32", disable_dynamic=True)[0] if args.base_student else None
    student, _ = build_student(teacher, args.preset, base, os.path.basename(args.teacher),
                               condconv_experts=args.condconv_experts, seed=args.seed)
    extra = (f", base {os.path.basename(args.base_student)}" if args.base_student else "") + \
        (f", {args.condconv_experts} CondConv experts" if args.condconv_experts else "")
    return teacher, student, f"preset {args.preset} built from the teacher{extra}"


def make_evaluator(args, rank: int, teacher, student, held):
    """The image evaluator of the held-out samples (``--vae``, ``--clip-vision``; rank 0 loads them, the other
    processes never evaluate), or None: the engine's held-out output-KD error alone."""
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes.host import distill as H
    from distilled_unets.nodes.host import judging as J

    if not args.vae:
        if args.clip_vision:
            raise D.DistillError("--clip-vision is given without --vae (the CLIP metrics judge the held-out images)",
                                 "give the teacher's VAE with --vae too", input_name="--vae")
        return None
    for flag, path in (("--vae", args.vae), ("--clip-vision", args.clip_vision)):
        if path and not os.path.isfile(path):
            raise D.DistillError(f"{flag} {path} does not exist", f"give an existing file to {flag}", path=path,
                                 input_name=flag)
    prediction = H.check_predictions(teacher, student, NODE)[0]
    vae = J.load_vae(args.vae) if rank == 0 else None
    cv = J.load_clip_vision(args.clip_vision) if rank == 0 and args.clip_vision else None
    return J.heldout_evaluator(teacher, held, vae, cv, prediction=prediction, steps=args.eval_sampling_steps,
                               seed=args.seed, node=NODE, features=bool(args.clip_vision))


def identity(args, world, run, data, held, student_what) -> dict:
    """What makes this run this run, by flag (run.json; a run into a folder of another is refused)."""
    cfg, d = run.distiller.cfg, run.distiller
    return {"--teacher": f"{os.path.basename(args.teacher)} ({os.path.getsize(args.teacher):,} bytes; "
                         f"{run.teacher_topology.describe()}; dtype {args.teacher_dtype})",
            "--student/--preset": f"{student_what}; {run.student_topology.describe()}",
            "--train": f"{args.train} ({len(d.train_names)} tensors)",
            "--data": f"{data.describe()}; content {data.fingerprint()}",
            "--heldout-data": f"{held.describe()}; content {held.fingerprint()}" if held else "none",
            "--batch-size x processes": cfg.batch_size * world, "--gradient-accumulation": cfg.grad_accum,
            "--lr": cfg.learning_rate, "--loss-weights": cfg.weights.describe(), "--features": cfg.features,
            "--seed": cfg.seed, "--ema-decay": cfg.ema_decay, "--max-grad-norm": cfg.grad_clip,
            "--weight-decay": cfg.weight_decay, "--precision": cfg.precision,
            "--vgg16": os.path.basename(args.vgg16) if args.vgg16 else "none",
            "--best-metric": args.best_metric or "none"}


def train(args, rank: int, world: int, device: torch.device) -> int:
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.distill import distributed, resources, runs
    from distilled_unets.models.students.distill.datasets import ShardedDataset, shard_files
    from distilled_unets.models.students.distill.launch import Stopper
    from distilled_unets.nodes.host import distill as H
    from distilled_unets.nodes.host.samples import prepare_sample
    from distilled_unets.nodes.host.students import PACK_VERSION
    from distilled_unets.nodes.host.unet import RECIPE_KEY, node_errors

    t_start = time.perf_counter()
    out = runs.check_folder(args.out)
    torch.manual_seed(args.seed)
    weights = D.parse_loss_weights(args.loss_weights)
    cfg = D.DistillConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.gradient_accumulation,
                          learning_rate=args.lr, weights=weights, features=args.features, seed=args.seed,
                          ema_decay=args.ema_decay, grad_clip=args.max_grad_norm, weight_decay=args.weight_decay,
                          gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                          checkpoint_every=args.checkpoint_every, checkpoint_dir=out,
                          checkpoint_prefix=CHECKPOINT_PREFIX, keep_checkpoints=args.keep_checkpoints,
                          max_nonfinite_steps=args.max_nonfinite_steps, selective_recompute=args.selective_recompute,
                          ema_on_host=args.ema_on_host, ema_every=args.ema_every)
    cfg.validate()
    for flag, path in (("teacher", args.teacher), ("student", args.student), ("base_student", args.base_student),
                       ("vgg16", args.vgg16)):
        if path and not os.path.isfile(path):
            raise D.DistillError("the file does not exist", "give the path of an existing file", path=path,
                                 input_name=flag)
    for flag, folder in (("--data", args.data), ("--heldout-data", args.heldout_data)):
        try:
            if folder:
                shard_files(folder)  # a wrong folder fails here, before the models load
        except D.DistillError as e:
            e.input_name = flag
            raise
    fraction = args.heldout_fraction if args.heldout_fraction is not None else (0.0 if args.heldout_data else 0.01)
    for ok, what, name, fix in (
            (not (args.heldout_data and fraction), "both --heldout-data and --heldout-fraction are given",
             "heldout_fraction", "give one of them"),
            (0 <= fraction < 1, f"--heldout-fraction is {fraction:g}", "heldout_fraction",
             "give a fraction in [0, 1) (0 = none)"),
            (args.prefetch >= 0, f"--prefetch is {args.prefetch}", "--prefetch", "give 0 (read in the loop) or more"),
            (args.open_shards >= 1, f"--open-shards is {args.open_shards}", "--open-shards", "give 1 or more")):
        if not ok:
            raise D.DistillError(what, fix, input_name=name)
    teacher, student, student_what = load_models(args)
    prepare = functools.partial(prepare_sample, teacher.model, node=NODE, input_name="--data")
    with node_errors(NODE, "--data"):
        data = ShardedDataset(args.data, prepare, max_open=args.open_shards)
    with node_errors(NODE, "--heldout-data"):
        held = ShardedDataset(args.heldout_data, prepare, max_open=args.open_shards) if args.heldout_data else None
    held_note = f"the samples of {held.describe()}" if held is not None else None
    if held is None:
        data, held, held_note = D.split_heldout(data, fraction)
    semantic, vgg_note = H.vgg_loss(args.vgg16, teacher, weights, node=NODE, input_name="vgg16") \
        if args.vgg16 else (None, None)
    hooks = {"on_eval": None, "save_best": None}
    run = H.make_run(teacher, student, data, held, cfg, train=TRAIN_CHOICES[args.train], device=device, node=NODE,
                     semantic=semantic, evaluator=make_evaluator(args, rank, teacher, student, held),
                     eval_schedule=D.EvalSchedule(args.eval_every, args.best_metric),
                     on_eval=lambda *a: hooks["on_eval"](*a), save_best=lambda *a: hooks["save_best"](*a),
                     prefetch=args.prefetch)
    d = run.distiller
    decision = key = ident = None
    if rank == 0:  # rank 0 hashes the shards; the digest cache goes to --out once the folder is accepted
        try:
            shards = data.shard_digests(out, save=False)
            if held is not None:
                held.shard_digests(out, save=False)
            key, ident = d.run_id, identity(args, world, run, data, held, student_what)
            decision = runs.open_folder(
                out, resume=args.resume, distiller=d, key=key, identity=ident, shards=shards,
                student_bytes=H.student_file_bytes(run, args.save_dtype),
                best=bool(args.best_metric), settings={
                    "steps": args.steps, "checkpoint_every": args.checkpoint_every, "eval_every": args.eval_every,
                    "keep_checkpoints": args.keep_checkpoints, "save_dtype": args.save_dtype,
                    "tensorboard": args.tensorboard})
            for ds in (data, held):
                if ds is not None:
                    ds.save_digests()
        except D.DistillError as e:
            decision = {"error": e}
    decision = distributed.broadcast_object(decision)
    if "error" in decision:
        raise decision["error"]
    if rank != 0:  # the digests from rank 0's cache (every rank checks a resumed checkpoint's data)
        for ds in (data, held):
            if ds is not None:
                ds.shard_digests(out)
    if decision["done"]:
        log.info("this run is finished: %s holds its student at step %d; nothing to do", decision["done"], cfg.steps)
        return EXIT_OK
    resume = decision["resume"]
    if not distributed.all_ranks(resume is None or os.path.isfile(resume), device if device.type == "cuda" else
                                 torch.device("cpu")):
        raise D.CheckpointError("the checkpoint to resume from is not visible on every node", "put --out on a file "
                                "system every node shares (at the same path)", path=resume, input_name="out")
    start = int(D.read_checkpoint_meta(resume)["step"]) if resume else 0
    est, free, where = H.load_teacher_and_check_memory(
        run, teacher, device, force_full_load=True, extra_fixes=H.own_blocks_fix(run, TRAIN_CHOICES[args.train]),
        processes=resources.local_processes(),
        options={"selective_recompute": "--selective-recompute", "ema_on_host": "--ema-on-host"})
    if rank == 0:
        log.info("teacher %s: %s", os.path.basename(args.teacher), run.teacher_topology.describe())
        log.info("student (%s): %s; trains %s (%d of %d units; block map %s)", student_what,
                 run.student_topology.describe(), TRAIN_CHOICES[args.train], len(run.units),
                 len(run.block_map.units), run.block_map_note)
        log.info("data: %s; held out: %s", data.describe(), held_note or "none")
        log.info("%d process(es) on %s x batch %d x accumulation %d = %d samples per step; memory per process: "
                 "%s; %.2f GiB is %s", world, device.type, cfg.batch_size, cfg.grad_accum,
                 cfg.batch_size * world * cfg.grad_accum, est.describe(), free / D.GIB, where)
        log.info("disk: %s", decision["disk"])
        if vgg_note:
            log.info("%s", vgg_note)
        when = f"every {args.eval_every} steps, at the start and the end" if args.eval_every else "at the start and end"
        best = f"; the best by {args.best_metric} goes to {runs.BEST}" if args.best_metric else ""
        log.info("evaluation: %s", f"{', '.join(d.metric_names or ['the evaluator'])} {when}{best}" if d.evaluates
                 else "none (no held-out samples)")
        log.info("resume: %s%s", decision["why"], f" ({resume}, step {start})" if resume else "")

    progress = Progress(rank=rank, world=world, start=start, total=cfg.steps, bar=not args.no_progress,
                        samples_per_step=cfg.batch_size * world * cfg.grad_accum)
    if rank == 0:
        progress.record = runs.RunLog(out, resume_from=resume, evaluates=d.evaluates, tensorboard=args.tensorboard,
                                      processes=world, learning_rate=cfg.learning_rate)
    hooks["on_eval"] = progress.evaluation
    recipe = dict(student.get_attachment(RECIPE_KEY) or {})  # as built or loaded (student-best gets it)
    write = functools.partial(H.write_student, out, topology=run.student_topology, prediction=run.prediction,
                              zsnr=run.zsnr, block_map=run.block_map, dtype=args.save_dtype, node=NODE)

    def save_best(step, state):  # called right after that evaluation's on_eval
        best = {"step": step, "metric": args.best_metric, "value": progress.last_metrics.get(args.best_metric)}
        meta = {runs.META_TRAINING: json.dumps({"run": key, "identity": ident, "best": best}, sort_keys=True)}
        path = write(state, recipe=dict(recipe, best=best), name_for=None, metadata=meta, replace=runs.BEST,
                     title=f"{student_what}: best {args.best_metric} at step {step}")
        log.info("best %s so far (%.5g at step %d): wrote %s", args.best_metric, best["value"], step, path)

    hooks["save_best"] = save_best
    stopper = Stopper(device).install()
    stopped = False
    try:
        res = d.run(cancel=stopper, resume=resume, on_step=progress, allow_changed_data=args.resume not in
                    ("auto", "none"))
        stopped = res.cancelled
    except KeyboardInterrupt:  # a second signal: stopped at once
        stopped = True
    finally:
        stopper.uninstall()
        progress.close()
    if stopped:
        if rank == 0:
            found = runs.checkpoints_in(out)
            log.warning("stopped (%s) at step %d; %s", stopper.signame or "a signal to another rank",
                        progress.times[-1][0], f"the same command resumes from {found[-1][2]}" if found else
                        "no checkpoint was written")
        return EXIT_SIGNAL
    for line in res.report:
        log.info("%s", line)
    seen = res.steps_done * cfg.batch_size * world * cfg.grad_accum
    log.info("samples seen in total: %s = %.3g %% of a BK-SDM run (batch 256 x 50K steps)", f"{seen:,}",
             100 * seen / D.BK_SDM_SAMPLES)
    if rank == 0:
        recipe = H.recipe_after(student, res, cfg, train=TRAIN_CHOICES[args.train], processes=world,
                                made_by=f"{PACK_VERSION} {NODE}")
        training = {"run": key, "identity": ident, "teacher": os.path.basename(args.teacher),
                    "student": student_what, "data": data.describe(), "processes": world,
                    "global_batch": cfg.batch_size * world, "config": json.loads(cfg.to_json()),
                    "resumed_from": os.path.basename(resume) if resume else None, "torch": torch.__version__,
                    "pack": PACK_VERSION}
        path = write(res.state_dict, recipe=recipe, title=f"{student_what} distilled {res.steps_done} steps",
                     name_for=lambda n: f"student-{res.steps_done:05d}{'' if n == 0 else f'_{n}'}.safetensors",
                     metadata={runs.META_TRAINING: json.dumps(training, sort_keys=True)})
        log.info("wrote %s (%.1f s in all; %.1f samples/s over the last steps)", path, time.perf_counter() - t_start,
                 progress.rate)
    return EXIT_OK


def main(argv=None, *, own_logging: bool = True) -> int:
    """Run the trainer; returns the exit code. ``own_logging`` False leaves logging as the caller set it up."""
    args = parse_args(argv)
    import_pack()  # the host-free parts import without ComfyUI (which must see this rank's GPU when it loads)
    from distilled_unets.models.errors import PackError
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.distill import launch

    started = launch.start(args.device, args.threads, own_logging)
    if started is None:
        return EXIT_BAD_INPUT
    rank, world, device = started
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            log.error("error: %s", TENSORBOARD_HINT)
            return EXIT_BAD_INPUT
    try:
        setup_comfy(args.comfyui, cpu=device.type != "cuda")
    except HostError as e:
        log.error("error: %s", e)
        return EXIT_BAD_INPUT
    code = EXIT_ERROR
    try:
        code = train(args, rank, world, device)
    except D.NonFiniteError as e:
        launch.name_error(e, NODE, FLAGS)
        log.error("error: %s%s", e, f" (last good checkpoint: {e.checkpoint})" if e.checkpoint else "")
        code = EXIT_NONFINITE
    except PackError as e:
        launch.name_error(e, NODE, FLAGS)
        log.error("error: %s", e)
        code = EXIT_BAD_INPUT
    finally:
        launch.end_process_group(code == EXIT_OK)
    return code


if __name__ == "__main__":
    sys.exit(main())
