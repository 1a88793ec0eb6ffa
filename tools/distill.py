"""Distil a student UNet from its teacher without a ComfyUI server: the engine of ``DistillStudentUNet``
(``models/students/distill/``) on ComfyUI's own UNet, one process or many under ``torchrun``.

One process (one GPU, or the CPU):

    python tools/distill.py --teacher sd15.safetensors --preset bk-small --data models/datasets/my_set \\
        --out runs/bk-small --steps 50000 --batch-size 64 --gradient-accumulation 4

Many processes: the same command under PyTorch's launcher (DistributedDataParallel over torch.distributed,
NCCL on GPUs, gloo on CPUs; ``--batch-size`` is per process, the global batch is batch x processes):

    torchrun --nproc_per_node=8 tools/distill.py ...                                   # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 tools/distill.py ...

Inputs: ``--teacher`` a checkpoint or UNet file (safetensors, or weights-only .ckpt/.pt); ``--student`` a UNet
file (e.g. from Save Student UNet) or ``--preset`` to build one from the teacher as Build Student UNet does;
``--data`` a folder written by ComfyUI's Save Training Dataset (shards streamed, each rank reads only the shards
of its own samples). Same seed and global batch give the same run at any number of processes.

What it writes under ``--out`` (rank 0 alone; the folder must be visible to every node):

* ``checkpoint_NNNNNNN.safetensors`` every ``--checkpoint-every`` steps and when stopped (the engine's resumable
  checkpoints, written atomically, never over a file);
* ``losses.csv``: step, loss, its terms, whether the step was skipped (non-finite); on resume it is rewritten
  from the checkpoint's history, so it always holds exactly the steps of the weights trained so far;
* ``student-NNNNN.safetensors`` (NNNNN = steps trained) at the end: the EMA weights (or the raw ones with
  ``--ema-decay 0``) in the file format ``Load Distilled UNet`` reads, with the recipe, block map and this
  run's settings in the metadata; never over a file (``_1``, ``_2`` ... if the name is taken).

Resume: ``--resume auto`` (the default) continues from the latest checkpoint in ``--out`` when it comes from the
same run (same settings, global batch, data and student), starts fresh when there is none, and refuses when the
latest one is from another run. So a job restarted by ``torchrun --max-restarts=N`` (after a rank died) or by a
scheduler picks up where it was with the same command line, and a finished run started again does nothing.
``--resume DIR|FILE`` continues from the latest checkpoint in DIR (or that file) even if settings changed (they
are reported); ``--resume none`` never resumes (and refuses an ``--out`` that already holds checkpoints).
Half-written files of a killed process (``.*.writing``) are removed from ``--out`` when a run starts.

Ctrl-C (or SIGTERM) stops after the current step on every rank, writes a checkpoint and exits with 130; a second
Ctrl-C stops at once. Exit codes: 0 done, 2 bad input (the message names the flag or file and the fix),
3 stopped by non-finite steps (several in a row; the last good checkpoint is named), 130 stopped by a signal,
1 anything else.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostError, import_pack, setup_comfy  # noqa: E402

log = logging.getLogger("distilled_unets")

TRAIN_CHOICES = {"all": "all", "student-blocks": "student blocks only", "changed-blocks": "changed blocks only"}
FEATURES = ("stages", "stages+mid", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
WEIGHT_DTYPES = ("default", "fp32", "fp16", "bf16")
CHECKPOINT_PREFIX = "checkpoint"
STUDENT_NAME = re.compile(r"^student-(\d+)(?:_\d+)?\.safetensors$")
META_TRAINING = "distilled_unets.training"
#: the engine's input names -> this script's flags (for error messages)
FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "gradient_accumulation": "--gradient-accumulation",
         "grad_accum": "--gradient-accumulation", "learning_rate": "--lr", "loss_weights": "--loss-weights",
         "ema_decay": "--ema-decay", "feature_points": "--features", "precision": "--precision",
         "checkpoint_every": "--checkpoint-every", "train": "--train", "resume": "--resume",
         "resume_from": "--resume", "latents": "--data", "conditioning": "--data", "teacher": "--teacher",
         "student": "--student", "preset": "--preset", "max_nonfinite_steps": "--max-nonfinite-steps"}
EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SIGNAL = 0, 1, 2, 3, 130


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
    d = ap.add_argument_group("data")
    d.add_argument("--data", required=True, help="a folder written by ComfyUI's Save Training Dataset")
    d.add_argument("--heldout-data", help="another such folder to measure the held-out output-KD error on")
    d.add_argument("--heldout-every", type=int, default=0, help="measure the held-out error every N steps "
                                                                 "(0: at the start and the end only)")
    t = ap.add_argument_group("training")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps (BK-SDM: 50,000 at batch 256)")
    t.add_argument("--batch-size", type=int, default=1, help="samples per forward pass, per process")
    t.add_argument("--gradient-accumulation", type=int, default=1,
                   help="forward passes per optimizer step (global batch = batch x processes x this)")
    t.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant (BK-SDM 5e-5)")
    t.add_argument("--loss-weights", default="bk-sdm",
                   help="bk-sdm (1/1/1), segmind (1/0.5/0.5), or TASK,OUT,FEAT[,MID] weights")
    t.add_argument("--features", choices=FEATURES, default="stages", help="feature KD points")
    t.add_argument("--train", choices=list(TRAIN_CHOICES), default="all",
                   help="which student weights train (student-blocks: A-SDM incubation)")
    t.add_argument("--seed", type=int, default=0, help="seeds sample order, timesteps and noise of every step")
    t.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the trained weights (0 = off)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast: auto = bf16 on a GPU (fp16 without bf16), fp32 on the CPU; master weights fp32")
    t.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="stop after this many steps in a row with a non-finite loss or gradient")
    o = ap.add_argument_group("output and resume")
    o.add_argument("--out", required=True, help="output folder (checkpoints, losses.csv, the student)")
    o.add_argument("--resume", default="auto",
                   help="auto: the latest checkpoint in --out of this same run; DIR or FILE: that one; none")
    o.add_argument("--checkpoint-every", type=int, default=500, help="write a checkpoint every N steps (0 = off)")
    o.add_argument("--save-dtype", choices=SAVE_DTYPES, default="fp32", help="dtype of the student file")
    r = ap.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when present (each rank on the GPU of its LOCAL_RANK), else the CPU")
    r.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    r.add_argument("--comfyui", help="the ComfyUI folder to use as a library (default: COMFYUI_PATH or ~/ComfyUI)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per 10 %% instead)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# processes


def init_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; the process group is started when there are
    several processes (NCCL on GPUs, gloo on CPUs), each rank on the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        store = _attempt_store(int(os.environ.get("RANK", "0")), world)
        if store is None:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo", store=store,
                                    rank=int(os.environ["RANK"]), world_size=world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def _attempt_store(rank: int, world: int):
    """torchrun's store with the keys of this restart apart (``TORCHELASTIC_RESTART_COUNT``), or None outside
    torchrun. After ``--max-restarts`` restarted the workers, the agent's store still holds the previous
    attempt's keys (torch 2.14, where this was written, no longer prefixes them per attempt), and the new process
    group would read the dead ranks' addresses and fail to connect."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=30), multi_tenant=not agent)
    return dist.PrefixStore(f"distilled_unets/attempt_{attempt}", store)


def _broadcast(value, rank: int):
    """``value`` of rank 0 on every rank."""
    if not dist.is_initialized():
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _everywhere(ok: bool, device: torch.device | None = None) -> bool:
    """Whether ``ok`` holds on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class Stopper:
    """SIGINT / SIGTERM set a flag; the engine's cancel callback (called before every step) agrees on it across
    ranks, so every rank stops at the same step, after the engine wrote a checkpoint. A second signal stops at
    once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self, device: torch.device):
        self.flag = False
        self.signame = ""
        self._device = device if device.type == "cuda" else torch.device("cpu")
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.flag:
            self.uninstall()
            raise KeyboardInterrupt
        self.flag = True
        self.signame = signal.Signals(signum).name
        log.warning("%s: stopping after this step and writing a checkpoint (again: stop now, no checkpoint)",
                    self.signame)

    def __call__(self) -> bool:
        return not _everywhere(not self.flag, self._device)


# ------------------------------------------------------------------------------------------------
# files under --out


def clean_partial(out: str) -> list[str]:
    """Remove the half-written files a killed process left (``.<name>.<pid>.writing``); returns their names."""
    gone = []
    for f in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if f.startswith(".") and f.endswith(".writing"):
            os.remove(os.path.join(out, f))
            gone.append(f)
    return gone


def checkpoints_in(folder: str) -> list[tuple[int, float, str]]:
    """(step, mtime, path) of every distillation checkpoint in ``folder``, oldest step first."""
    from distilled_unets.models.students import distill as D

    found = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.startswith(".") or not f.endswith(".safetensors") or STUDENT_NAME.match(f):
            continue
        path = os.path.join(folder, f)
        try:
            meta = D.read_checkpoint_meta(path)
        except D.CheckpointError:
            continue
        found.append((int(meta.get("step", "0")), os.path.getmtime(path), path))
    return sorted(found)


def latest_checkpoint(where: str) -> str:
    """The checkpoint ``where`` names: the file itself, or the latest (highest step) in a folder."""
    from distilled_unets.models.students import distill as D

    if os.path.isfile(where):
        D.read_checkpoint_meta(where)
        return where
    found = checkpoints_in(where)
    if not found:
        raise D.CheckpointError("no distillation checkpoint there", "give a folder or file a run wrote with "
                                "--checkpoint-every, or --resume none", path=where, input_name="resume")
    return found[-1][2]


def run_key(cfg, global_batch: int, fingerprint: str, structure: str, trainable: list[str]) -> str:
    """What makes two runs the same (every reproducing setting but the step count)."""
    c = json.loads(cfg.to_json())
    for k in ("steps", "checkpoint_every", "checkpoint_prefix", "heldout_every"):
        c.pop(k, None)
    raw = json.dumps([c, global_batch, fingerprint, structure, trainable], sort_keys=True)
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def choose_resume(args, d, out: str) -> tuple[str | None, str]:
    """(checkpoint to resume from or None, why), on rank 0. See the module docstring for --resume."""
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.distill.checkpoints import differences

    mode = args.resume
    if mode == "none":
        if checkpoints_in(out):
            raise D.CheckpointError("--out already holds checkpoints of a run and --resume is none",
                                    "pick an empty --out, or --resume auto to continue that run", path=out,
                                    input_name="resume")
        return None, "a new run"
    if mode != "auto":
        return latest_checkpoint(mode), "asked for"
    found = checkpoints_in(out)
    if not found:
        return None, "a new run (no checkpoint in --out)"
    path = found[-1][2]
    meta = D.read_checkpoint_meta(path)
    diff = differences(meta, d.cfg, d.cfg.batch_size * d.world_size)
    if meta.get("data") != d.data.fingerprint():
        diff.append("the training data")
    if meta.get("student_structure") != d.st.describe() or json.loads(meta.get("trainable", "[]")) != d.train_names:
        diff.append("the student or --train")
    if diff:
        raise D.CheckpointError(f"the latest checkpoint in --out is from another run ({', '.join(diff)} differ)",
                                f"continue it anyway with --resume {out}, or pick another --out", path=path,
                                input_name="resume")
    return path, "the latest checkpoint of this run in --out"


def finished_student(out: str, steps: int, key: str) -> str | None:
    """A student file in ``out`` this same run already wrote at ``steps`` (a finished run started again)."""
    from safetensors import safe_open

    for f in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        m = STUDENT_NAME.match(f)
        if not m or int(m.group(1)) != steps:
            continue
        try:
            with safe_open(os.path.join(out, f), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get(META_TRAINING, "{}"))
        except Exception:  # not ours or unreadable: not this run's
            continue
        if meta.get("run") == key:
            return os.path.join(out, f)
    return None


TERM_ORDER = ("task", "out", "feat", "mid", "vgg")


class LossLog:
    """``losses.csv`` on rank 0: one row per step (step, loss, its terms, skipped). On start it is rewritten (a
    temporary file, then renamed) to the history of the checkpoint resumed from, so a row written after that
    checkpoint by a run that died, or half a row, never stays; then rows are appended and flushed per step."""

    def __init__(self, path: str):
        self.path = path
        self.columns: list[str] | None = None
        self._f = None

    def _header(self, terms) -> list[str]:
        ordered = [k for k in TERM_ORDER if k in terms] + sorted(k for k in terms if k not in TERM_ORDER)
        return ["step", "loss", *ordered, "skipped"]

    def start(self, history=None):
        tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.{os.getpid()}.writing")
        with open(tmp, "w", newline="") as f:
            if history is not None and history[0]:
                losses, parts, skipped = history
                self.columns = self._header([k for k in parts])
                w = csv.writer(f)
                w.writerow(self.columns)
                bad = set(skipped)
                for i, loss in enumerate(losses):
                    w.writerow([i + 1, repr(float(loss)), *(repr(float(parts[k][i])) for k in self.columns[2:-1]),
                                int(i in bad)])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", newline="")

    def row(self, step: int, terms: dict, applied: bool):
        if self.columns is None:
            self.columns = self._header([k for k in terms if k != "loss"])
            self._f.write(",".join(self.columns) + "\n")
        vals = [str(step), repr(float(terms["loss"]))]
        vals += [repr(float(terms.get(k, float("nan")))) for k in self.columns[2:-1]]
        self._f.write(",".join(vals + [str(int(not applied))]) + "\n")
        self._f.flush()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def read_losses(path: str) -> list[dict]:
    """The rows of a ``losses.csv`` (values as floats, step and skipped as ints)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def check_finite_weights(state: dict) -> None:
    """Refuse to write non-finite weights: NonFiniteError naming the first bad tensor."""
    from distilled_unets.models.students import distill as D

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise D.NonFiniteError(f"{len(bad)} of {len(state)} student tensors hold NaN or infinite values (first: "
                               f"{bad[0]}); no student file was written",
                               "resume from the last good checkpoint with a lower --lr or bf16/fp32 --precision, "
                               "and check the data for NaN/inf", input_name="lr")


def write_student(out: str, state: dict, *, topology, prediction: str, zsnr: bool, block_map, recipe: dict,
                  steps: int, dtype: str, title: str, training: dict) -> str:
    """``out/student-NNNNN.safetensors`` through Save Student UNet's writer (ComfyUI's ModelSave layout, recipe,
    block map, prediction type), never over a file; refuses non-finite weights before writing anything."""
    from distilled_unets.nodes.host.unet import BLOCK_MAP_KEY, RECIPE_KEY, model_from_state_dict
    from distilled_unets.nodes.students import write_unet

    check_finite_weights(state)
    attachments = {RECIPE_KEY: recipe}
    if block_map is not None:
        attachments[BLOCK_MAP_KEY] = block_map
    model = model_from_state_dict(topology, state, prediction=prediction, zsnr=zsnr, weight_dtype="fp32",
                                  attachments=attachments)
    return write_unet(model, out, lambda n: f"student-{steps:05d}{'' if n == 0 else f'_{n}'}.safetensors", dtype,
                      title, extra_metadata={META_TRAINING: json.dumps(training, sort_keys=True)})


# ------------------------------------------------------------------------------------------------
# progress


class TqdmHandler(logging.Handler):
    """Log lines through tqdm.write, so they do not break the progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(rank: int, world: int) -> None:
    handler = TqdmHandler()
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class Progress:
    """A tqdm bar on rank 0: step, loss, samples/s (over the last 20 steps); the losses.csv rows."""

    def __init__(self, *, rank: int, start: int, total: int, samples_per_step: int, losses: LossLog | None,
                 bar: bool):
        self.rank, self.total, self.per_step, self.losses = rank, total, samples_per_step, losses
        self.times = deque([(start, time.perf_counter())], maxlen=21)
        self.rate = float("nan")
        self.bar = None
        self._next_line = start
        if rank == 0 and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc="distil")

    def __call__(self, step: int, terms: dict, applied: bool):
        now = time.perf_counter()
        self.times.append((step, now))
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        if len(self.times) > 2:  # the first step after the start includes warm-up: leave it out when we can
            (s0, t0) = self.times[1]
        if s1 > s0 and t1 > t0:
            self.rate = (s1 - s0) * self.per_step / (t1 - t0)
        if self.rank != 0:
            return
        if self.losses is not None:
            self.losses.row(step, terms, applied)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{terms['loss']:.5f}", samples_s=f"{self.rate:.1f}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step >= self._next_line or step == self.total:
            self._next_line = step + max(1, self.total // 10)
            log.info("step %d/%d  loss %.5f  %.1f samples/s", step, self.total, terms["loss"], self.rate)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# the run


def _loss_weights(spec: str):
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes.distill import make_loss_weights

    if spec in ("bk-sdm", "segmind"):
        return make_loss_weights(spec, 1, 1, 1, 1, 1)
    try:
        vals = [float(x) for x in spec.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4):
        raise D.DistillError(f"--loss-weights is {spec!r}", "give bk-sdm, segmind, or TASK,OUT,FEAT[,MID] numbers",
                             input_name="loss_weights")
    return D.LossWeights(*vals)


def _load_models(args, device):
    """(teacher MODEL, student MODEL, student description) as the pack's loader and builder make them."""
    from distilled_unets.nodes.host.unet import load_distilled_unet, node_errors
    from distilled_unets.nodes.students import build_student

    with node_errors("tools/distill.py", "teacher"):  # a file's errors name its flag
        teacher, _ = load_distilled_unet(args.teacher, args.teacher_dtype, disable_dynamic=True)
    if args.student:
        with node_errors("tools/distill.py", "student"):
            student, _ = load_distilled_unet(args.student, "fp32", disable_dynamic=True)
        what = f"student file {os.path.basename(args.student)}"
    else:
        with node_errors("tools/distill.py", "--base-student"):
            base = load_distilled_unet(args.base_student, "fp32", disable_dynamic=True)[0] if args.base_student \
                else None
        student, _ = build_student(teacher, args.preset, base, os.path.basename(args.teacher),
                                   condconv_experts=args.condconv_experts, seed=args.seed)
        what = f"preset {args.preset} built from the teacher"
    return teacher, student, what


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def train(args, rank: int, world: int, device: torch.device) -> int:
    import comfy.model_management as mm
    from distilled_unets.models.errors import IncompatibleModelsError
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.distill.checkpoints import read_history
    from distilled_unets.models.students.distill.datasets import ShardedDataset, shard_files
    from distilled_unets.nodes.distill import BK_SDM_SAMPLES, block_map_for, student_unet_for_training, trainable_filter
    from distilled_unets.nodes.host.unet import RECIPE_KEY, node_errors, topology_of
    from distilled_unets.nodes.students import PACK_VERSION, sampling_of

    t_start = time.perf_counter()
    out = os.path.abspath(args.out)
    torch.manual_seed(args.seed)
    weights = _loss_weights(args.loss_weights)
    cfg = D.DistillConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.gradient_accumulation,
                          learning_rate=args.lr, weights=weights, features=args.features, seed=args.seed,
                          ema_decay=args.ema_decay, grad_clip=args.max_grad_norm, weight_decay=args.weight_decay,
                          gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                          checkpoint_every=args.checkpoint_every, checkpoint_dir=out,
                          checkpoint_prefix=CHECKPOINT_PREFIX, heldout_every=args.heldout_every,
                          max_nonfinite_steps=args.max_nonfinite_steps)
    cfg.validate()
    for flag, path in (("teacher", args.teacher), ("student", args.student), ("base_student", args.base_student)):
        if path and not os.path.exists(path):
            raise D.DistillError("the file does not exist", "give the path of a UNet or checkpoint file", path=path,
                                 input_name=flag)
    for flag, folder in (("--data", args.data), ("--heldout-data", args.heldout_data)):
        try:
            if folder:
                shard_files(folder)  # a wrong folder fails here, before the models load
        except D.DistillError as e:
            e.input_name = flag
            raise
    teacher, student, student_what = _load_models(args, device)
    tt, st = topology_of(teacher), topology_of(student)
    pred_t, zsnr_t = sampling_of(teacher, "tools/distill.py", "teacher")
    pred_s, zsnr_s = sampling_of(student, "tools/distill.py", "student")
    if (pred_t, zsnr_t) != (pred_s, zsnr_s):
        raise IncompatibleModelsError(f"the teacher predicts {pred_t}, the student {pred_s}",
                                      "distil a student of the teacher's prediction type", input_name="student")
    from distilled_unets.nodes.host.samples import prepare_sample

    prepare = functools.partial(prepare_sample, teacher.model, node="tools/distill.py", input_name="--data")
    with node_errors("tools/distill.py", "--data"):
        data = ShardedDataset(args.data, prepare)
    with node_errors("tools/distill.py", "--heldout-data"):
        held = ShardedDataset(args.heldout_data, prepare) if args.heldout_data else None
    bm, bm_note = block_map_for(student, tt, st)
    trainable, units = trainable_filter(bm, TRAIN_CHOICES[args.train])
    tmodel = teacher.model
    d = D.Distiller(teacher=tmodel.diffusion_model, student=student_unet_for_training(student, st), teacher_topology=tt,
                    student_topology=st, schedule=D.NoiseSchedule(teacher.get_model_object("model_sampling"),
                                                                  prediction=pred_t),
                    data=data, heldout=held, config=cfg, trainable=trainable, device=device,
                    teacher_dtype=tmodel.manual_cast_dtype or tmodel.get_dtype(), node="tools/distill.py")
    global_batch = cfg.batch_size * world
    key = run_key(cfg, global_batch, data.fingerprint(), st.describe(), d.train_names)

    # rank 0 decides what to resume from (and whether the run is already finished); everyone follows
    decision = None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            gone = clean_partial(out)
            if gone:
                log.info("removed %d half-written file(s) a stopped process left in %s: %s", len(gone), out,
                         ", ".join(gone))
            done = finished_student(out, cfg.steps, key) if args.resume == "auto" else None
            resume, why = (None, "") if done else choose_resume(args, d, out)
            decision = {"done": done, "resume": resume, "why": why}
        except D.DistillError as e:
            decision = {"error": e}
    decision = _broadcast(decision, rank)
    if "error" in decision:
        raise decision["error"]
    if decision["done"]:
        log.info("this run is finished: %s holds its student at step %d; nothing to do", decision["done"],
                 cfg.steps)
        return EXIT_OK
    resume = decision["resume"]
    if not _everywhere(resume is None or os.path.isfile(resume)):
        raise D.CheckpointError("the checkpoint to resume from is not visible on every node", "put --out on a file "
                                "system every node shares (at the same path)", path=resume, input_name="out")
    start = int(D.read_checkpoint_meta(resume)["step"]) if resume else 0

    est = d.estimate_memory(teacher_resident=True)
    mm.load_models_gpu([teacher], memory_required=est.total, force_full_load=True)
    d.check_memory(mm.get_free_memory(device), teacher_resident=True)
    if rank == 0:
        log.info("teacher %s: %s", os.path.basename(args.teacher), tt.describe())
        log.info("student (%s): %s; trains %s (%d of %d units; block map %s)", student_what, st.describe(),
                 TRAIN_CHOICES[args.train], len(units), len(bm.units), bm_note)
        log.info("data: %s%s", data.describe(), f"; held out: {held.describe()}" if held else "")
        log.info("%d process(es) on %s x batch %d x accumulation %d = %d samples per step; memory estimate per "
                 "process: %s", world, device.type, cfg.batch_size, cfg.grad_accum, global_batch * cfg.grad_accum,
                 est.describe())
        log.info("resume: %s%s", decision["why"], f" ({resume}, step {start})" if resume else "")

    losses = None
    if rank == 0:
        losses = LossLog(os.path.join(out, "losses.csv"))
        losses.start(read_history(resume) if resume else None)
    progress = Progress(rank=rank, start=start, total=cfg.steps, samples_per_step=global_batch * cfg.grad_accum,
                        losses=losses, bar=not args.no_progress)
    stopper = Stopper(device).install()
    stopped = False
    try:
        res = d.run(cancel=stopper, resume=resume, on_step=progress)
        stopped = res.cancelled
    except KeyboardInterrupt:  # a second signal: stopped at once
        stopped = True
    finally:
        stopper.uninstall()
        progress.close()
        if losses is not None:
            losses.close()
    if stopped:
        if rank == 0:
            found = checkpoints_in(out)
            log.warning("stopped (%s) at step %d; %s", stopper.signame or "a signal to another rank",
                        progress.times[-1][0], f"the same command resumes from {found[-1][2]}" if found else
                        "no checkpoint was written")
        return EXIT_SIGNAL
    for line in res.report:
        log.info("%s", line)
    seen = res.steps_done * global_batch * cfg.grad_accum
    log.info("samples seen in total: %s = %.3g %% of a BK-SDM run (batch 256 x 50K steps)", f"{seen:,}",
             100 * seen / BK_SDM_SAMPLES)
    if rank == 0:
        recipe = dict(student.get_attachment(RECIPE_KEY) or {})
        recipe["distilled"] = list(recipe.get("distilled", [])) + [{
            "steps": res.steps_done, "samples_seen": seen, "batch_size": cfg.batch_size, "processes": world,
            "gradient_accumulation": cfg.grad_accum, "learning_rate": cfg.learning_rate,
            "loss_weights": weights.describe(), "feature_points": cfg.features, "train": TRAIN_CHOICES[args.train],
            "seed": cfg.seed, "ema_decay": cfg.ema_decay, "heldout_before": _finite(res.heldout_before),
            "heldout_after": _finite(res.heldout_after), "made_by": f"{PACK_VERSION} tools/distill.py"}]
        training = {"run": key, "teacher": os.path.basename(args.teacher), "student": student_what,
                    "data": data.describe(), "processes": world, "global_batch": global_batch,
                    "config": json.loads(cfg.to_json()), "resumed_from": os.path.basename(resume) if resume else None,
                    "torch": torch.__version__, "pack": PACK_VERSION}
        path = write_student(out, res.state_dict, topology=st, prediction=pred_s, zsnr=zsnr_s, block_map=bm,
                             recipe=recipe, steps=res.steps_done, dtype=args.save_dtype,
                             title=f"{student_what} distilled {res.steps_done} steps", training=training)
        log.info("wrote %s (%.1f s in all; %.1f samples/s over the last steps)", path,
                 time.perf_counter() - t_start, progress.rate)
    return EXIT_OK


def main(argv=None, *, own_logging: bool = True) -> int:
    """Run the trainer; returns the exit code. ``own_logging`` False leaves logging as the caller set it up."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda, but no CUDA device is visible\n")
        return EXIT_BAD_INPUT
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args.device)
    if own_logging:
        setup_logging(rank, world)
        logging.getLogger().setLevel(logging.WARNING)  # ComfyUI's own info lines
    try:
        setup_comfy(args.comfyui, cpu=device.type != "cuda")
        import_pack()
        from distilled_unets.models.errors import PackError
        from distilled_unets.models.students import distill as D
    except HostError as e:
        log.error("error: %s", e)
        return EXIT_BAD_INPUT
    code = EXIT_ERROR
    try:
        code = train(args, rank, world, device)
    except D.NonFiniteError as e:
        e.node = "tools/distill.py"
        e.input_name = FLAGS.get(e.input_name, e.input_name)
        log.error("error: %s%s", e, f" (last good checkpoint: {e.checkpoint})" if e.checkpoint else "")
        code = EXIT_NONFINITE
    except PackError as e:
        e.node = "tools/distill.py"
        e.input_name = FLAGS.get(e.input_name, e.input_name)
        log.error("error: %s", e)
        code = EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            if code == EXIT_OK:
                dist.barrier()
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
