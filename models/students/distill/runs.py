"""A run's output folder, as the headless trainer keeps it: one run per folder, nothing of another run
overwritten or mixed in, bounded on disk.

What a folder holds (all written by rank 0, every file atomically):

* ``run.json``: the run's identity (every setting that makes it this run: teacher, student, data, global
  batch, learning rate, ... as named on the command line) and its other settings (steps, checkpointing,
  evaluation), written at start. A run whose identity differs from the folder's is refused with the
  differences named, whether or not a checkpoint was written; a folder from before ``run.json`` is judged
  by what it holds (a checkpoint's or a student file's recorded settings; a bare ``losses.csv`` is another
  run whose settings are unknown).
* ``checkpoint_NNNNNNN.safetensors`` (the engine's; the newest ``keep`` of them), ``losses.csv`` (step, loss,
  its terms, skipped), ``eval.csv`` (step, metrics), ``student-NNNNN.safetensors`` (the result) and
  ``student-best.safetensors`` (the best evaluation's weights).
* ``.<name>.<pid>.writing``: half-written files of a killed process, removed when a run starts.

:func:`disk_plan` is what the run will hold at most against the free space where the folder lives.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

from ...files import atomic
from .checkpoints import data_changes, differences, read_checkpoint_meta
from .errors import CheckpointError, DiskSpaceError, RunFolderError
from .fingerprint import changed_shards
from .memory import GIB

log = logging.getLogger("distilled_unets")

RUN_FILE = "run.json"
LOSSES = "losses.csv"
EVALS = "eval.csv"
BEST = "student-best.safetensors"
STUDENT_NAME = re.compile(r"^student-(\d+)(?:_\d+)?\.safetensors$")
#: the student file's metadata key with the run's settings
META_TRAINING = "distilled_unets.training"
RUN_FORMAT = "distilled_unets.run"


# ------------------------------------------------------------------------------------------------
# what the folder holds


def check_folder(out: str, *, input_name: str = "out") -> str:
    """``out`` as an absolute path; a typed error when it names something that is not a folder."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError("the output folder names an existing file", "give a folder (new or a run's own)",
                             path=out, input_name=input_name)
    return out


def clean_partial(out: str) -> list[str]:
    """Remove the half-written files a killed process left (``.<name>.<pid>.writing``); returns their names."""
    return atomic.remove_partial(out)


def checkpoints_in(folder: str) -> list[tuple[int, float, str]]:
    """(step, mtime, path) of every distillation checkpoint in ``folder``, oldest step first."""
    found = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.startswith(".") or not f.endswith(".safetensors") or STUDENT_NAME.match(f) or f == BEST:
            continue
        path = os.path.join(folder, f)
        try:
            meta = read_checkpoint_meta(path)
        except CheckpointError:
            continue
        found.append((int(meta.get("step", "0")), os.path.getmtime(path), path))
    return sorted(found)


def latest_checkpoint(where: str) -> str:
    """The checkpoint ``where`` names: the file itself, or the latest (highest step) in a folder."""
    if os.path.isfile(where):
        read_checkpoint_meta(where)
        return where
    found = checkpoints_in(where)
    if not found:
        raise CheckpointError("no distillation checkpoint there", "give a folder or file a run wrote with "
                              "checkpoints, or start a new run", path=where, input_name="resume")
    return found[-1][2]


def _student_training(path: str) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_TRAINING)
        return json.loads(raw) if raw else None
    except Exception:  # not ours or unreadable
        return None


def students_in(out: str) -> list[str]:
    return [os.path.join(out, f) for f in sorted(os.listdir(out)) if STUDENT_NAME.match(f)] \
        if os.path.isdir(out) else []


def finished_student(out: str, steps: int, key: str) -> str | None:
    """A student file in ``out`` this same run already wrote at ``steps`` (a finished run started again)."""
    for path in students_in(out):
        m = STUDENT_NAME.match(os.path.basename(path))
        if int(m.group(1)) == steps and (_student_training(path) or {}).get("run") == key:
            return path
    return None


def run_files(out: str) -> list[str]:
    """The names of what a run leaves in ``out`` (run.json, checkpoints, students, csv logs, the best)."""
    if not os.path.isdir(out):
        return []
    names = {RUN_FILE, LOSSES, EVALS, BEST}
    held = [f for f in sorted(os.listdir(out)) if f in names or STUDENT_NAME.match(f)]
    return held + [os.path.basename(p) for _, _, p in checkpoints_in(out)]


# ------------------------------------------------------------------------------------------------
# run.json: one run per folder


def read_run_file(out: str) -> dict | None:
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{RUN_FILE} cannot be read ({e})", "restore it, or pick another output folder",
                             path=path, input_name="out") from e
    if not isinstance(rec, dict) or rec.get("format") != RUN_FORMAT or not isinstance(rec.get("identity"), dict):
        raise RunFolderError(f"{RUN_FILE} is not a run record of this pack", "pick another output folder",
                             path=path, input_name="out")
    return rec


def write_run_file(out: str, record: dict) -> str:
    """Write ``out/run.json`` atomically (a temporary file, synced, then renamed over the old one)."""
    path = os.path.join(out, RUN_FILE)
    atomic.write_json(path, dict(record, format=RUN_FORMAT), sync=True, indent=1, sort_keys=True)
    return path


def identity_differences(old: dict, new: dict) -> list[str]:
    """``name (old -> new)`` for every identity setting that differs."""
    out = []
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k, "(not recorded)"), new.get(k, "(not recorded)")
        if a != b:
            out.append(f"{k} ({a} -> {b})")
    return out


def earlier_run(out: str, identity: dict, key: str, *, config, global_batch: int, data, structure: str,
                trainable: list[str]) -> tuple[str, list[str]] | None:
    """(what in ``out`` belongs to another run, how it differs), or None when ``out`` holds nothing or only this
    same run. ``identity``/``key``: this run's; the rest judges a folder from before run.json by its files."""
    rec = read_run_file(out)
    if rec is not None:
        if rec.get("run") == key and rec["identity"] == identity:
            return None
        diff = identity_differences(rec["identity"], identity)
        return RUN_FILE, diff or ["the run's identity (data content or structure)"]
    found = checkpoints_in(out)
    if found:
        path = found[-1][2]
        meta = read_checkpoint_meta(path)
        if meta.get("run") != key:
            diff = differences(meta, config, global_batch) + data_changes(meta, data)
            if meta.get("student_structure") != structure or json.loads(meta.get("trainable", "[]")) != trainable:
                diff.append("the student or what trains")
            if diff:
                return os.path.basename(path), diff
    for path in students_in(out):
        t = _student_training(path)
        if t is None or t.get("run") == key:
            continue
        meta = {"config": json.dumps(t.get("config", {})), "global_batch": str(t.get("global_batch", 0))}
        diff = differences(meta, config, global_batch) or ["the data, the student or what trains"]
        return os.path.basename(path), diff
    if not found:
        left = [f for f in (LOSSES, EVALS, BEST) if os.path.exists(os.path.join(out, f))]
        if left:
            return left[0], ["its settings were not recorded (no run.json, no checkpoint)"]
    return None


# ------------------------------------------------------------------------------------------------
# csv logs


class CsvLog:
    """A csv file of one row per step, on rank 0. ``start(rows)`` rewrites it (a temporary file, then renamed)
    to the rows of the checkpoint resumed from, so a row written after that checkpoint by a run that died, or
    half a row, never stays; then rows are appended and flushed one by one."""

    def __init__(self, path: str, order: tuple[str, ...] = (), last: tuple[str, ...] = ()):
        self.path = path
        self.order, self.last = order, last
        self.columns: list[str] | None = None
        self._f = None

    def _header(self, keys) -> list[str]:
        keys = [k for k in keys if k != "step"]
        first = [k for k in self.order if k in keys]
        tail = [k for k in self.last if k in keys]
        return ["step", *first, *sorted(k for k in keys if k not in first and k not in tail), *tail]

    def start(self, rows: list[dict] | None = None):
        with atomic.replacing(self.path, "w", sync=True, newline="") as f:
            if rows:
                self.columns = self._header(rows[0])
                w = csv.writer(f)
                w.writerow(self.columns)
                for r in rows:
                    w.writerow([_cell(r.get(k, float("nan"))) for k in self.columns])
        self._f = open(self.path, "a", newline="")

    def row(self, values: dict):
        if self.columns is None:
            self.columns = self._header(values)
            self._f.write(",".join(self.columns) + "\n")
        self._f.write(",".join(_cell(values.get(k, float("nan"))) for k in self.columns) + "\n")
        self._f.flush()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def _cell(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


TERM_ORDER = ("loss", "task", "out", "feat", "mid", "vgg")


def loss_log(out: str) -> CsvLog:
    """``losses.csv``: step, loss, its terms, skipped (1: the step had a non-finite loss or gradient)."""
    return CsvLog(os.path.join(out, LOSSES), order=TERM_ORDER, last=("skipped",))


def loss_rows(history) -> list[dict]:
    """losses.csv rows from a checkpoint's (losses, terms, skipped steps)."""
    losses, parts, skipped = history
    bad = set(skipped)
    return [{"step": i + 1, "loss": v, **{k: parts[k][i] for k in parts}, "skipped": int(i in bad)}
            for i, v in enumerate(losses)]


def eval_log(out: str) -> CsvLog:
    """``eval.csv``: step and every metric of the evaluation."""
    return CsvLog(os.path.join(out, EVALS))


def read_csv(path: str) -> list[dict]:
    """The rows of a ``losses.csv`` or ``eval.csv`` (values as floats, step and skipped as ints)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


class RunLog:
    """What a run records as it goes, on rank 0: ``losses.csv``, ``eval.csv`` (when the run evaluates) and,
    with ``tensorboard`` (a folder), TensorBoard scalars: ``loss/*`` (the loss and each term),
    ``throughput/samples_per_s`` (all processes) and ``..._per_process``, ``train/learning_rate``,
    ``train/skipped_steps`` (so far), ``eval/<metric>``. Resumed from a checkpoint, the csv files are rewritten
    to its history and TensorBoard drops the events after its step (``purge_step``)."""

    def __init__(self, out: str, *, resume_from: str | None, evaluates: bool, tensorboard: str | None = None,
                 processes: int = 1, learning_rate: float = 0.0):
        from .checkpoints import read_evaluations, read_history

        self.processes, self.lr = processes, learning_rate
        history = read_history(resume_from) if resume_from else None
        self.skipped = len(history[2]) if history else 0
        self.losses = loss_log(out)
        self.losses.start(loss_rows(history) if history else None)
        self.evals = eval_log(out) if evaluates else None
        if self.evals is not None:
            self.evals.start(read_evaluations(resume_from) if resume_from else None)
        self.board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            start = int(read_checkpoint_meta(resume_from)["step"]) if resume_from else None
            self.board = SummaryWriter(tensorboard, purge_step=start)

    def step(self, step: int, terms: dict, applied: bool, samples_per_s: float) -> None:
        self.skipped += int(not applied)
        self.losses.row({"step": step, **terms, "skipped": int(not applied)})
        if self.board is None:
            return
        for k, v in terms.items():
            self.board.add_scalar(f"loss/{k}", v, step)
        if samples_per_s == samples_per_s:  # not NaN (no rate before the second step)
            self.board.add_scalar("throughput/samples_per_s", samples_per_s, step)
            self.board.add_scalar("throughput/samples_per_s_per_process", samples_per_s / self.processes, step)
        self.board.add_scalar("train/learning_rate", self.lr, step)
        self.board.add_scalar("train/skipped_steps", self.skipped, step)

    def evaluation(self, step: int, metrics: dict) -> None:
        if self.evals is not None:
            self.evals.row({"step": step, **metrics})
        if self.board is not None:
            for k, v in metrics.items():
                self.board.add_scalar(f"eval/{k}", v, step)
            self.board.flush()

    def close(self) -> None:
        for f in (self.losses, self.evals):
            if f is not None:
                f.close()
        if self.board is not None:
            self.board.close()
            self.board = None


# ------------------------------------------------------------------------------------------------
# disk


def human_bytes(b: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} bytes"


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


@dataclass(frozen=True)
class DiskPlan:
    """What a run will hold on disk at most, against the free space where its folder lives."""

    checkpoint: int       # bytes of one checkpoint
    keep: int             # checkpoints kept (0: all)
    held: int             # checkpoints on disk at most (keep, and one more while the next is written)
    student: int          # the final student file
    best: int             # the best student (0: none kept); twice while it is replaced
    already: int          # this run's files already in the folder (they are replaced, not added to)
    free: int             # free bytes where the folder lives
    folder: str

    @property
    def peak(self) -> int:
        return self.held * self.checkpoint + self.student + 2 * self.best

    @property
    def needed(self) -> int:
        return max(0, self.peak - self.already)

    def describe(self) -> str:
        g = human_bytes
        ck = f"{self.held} checkpoints of {g(self.checkpoint)}"
        if self.keep:
            ck += f" (--keep-checkpoints {self.keep}, one more while the next is written)"
        best = f" + the best student {g(self.best)} (twice while it is replaced)" if self.best else ""
        have = f"; {g(self.already)} of it is already there" if self.already else ""
        return (f"one checkpoint weighs {g(self.checkpoint)}; the run holds at most {ck} + the student "
                f"{g(self.student)}{best} = {g(self.peak)}{have}; {g(self.free)} is free on the disk of {self.folder}")


def disk_plan(folder: str, *, checkpoint: int, keep: int, checkpoints: int, student: int, best: int,
              already: int = 0) -> DiskPlan:
    """The plan of a run writing ``checkpoints`` checkpoints (all it writes when nothing is deleted) into
    ``folder``; the free space is ``shutil.disk_usage`` of the folder (or of its nearest existing parent)."""
    held = min(checkpoints, keep + 1) if keep else checkpoints
    free = shutil.disk_usage(_existing(folder)).free
    return DiskPlan(checkpoint, keep, held, student, best, already, int(free), os.path.abspath(folder))


def check_disk(plan: DiskPlan, *, fixes: list[str], node: str | None = None, input_name: str | None = None,
               margin: float = 0.95) -> None:
    """A typed error with the figures and the fixes when the plan does not fit ``margin`` of the free space."""
    if plan.needed <= plan.free * margin:
        return
    raise DiskSpaceError(f"the run would not fit on disk: {plan.describe()}", "; or ".join(fixes),
                         needed=plan.needed, free=plan.free, path=plan.folder, node=node, input_name=input_name)


def files_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


# ------------------------------------------------------------------------------------------------
# opening a run's folder


#: how the fixes name the settings: the trainer's flags, or the node's inputs
FLAG_NAMES = {"keep": "--keep-checkpoints", "ema": "--ema-decay", "out": "an output folder (--out)"}
INPUT_NAMES = {"keep": "keep_checkpoints", "ema": "ema_decay", "out": "ComfyUI's output folder"}


def plan_run_disk(out: str, distiller, *, student_bytes: int, best: bool, held_paths: list[str],
                  names: dict = FLAG_NAMES, node: str | None = None) -> DiskPlan:
    """The disk a run of ``distiller`` into ``out`` needs; a typed error (figures and fixes) when it does not fit.
    ``student_bytes``: the student file's tensors (0: no student is written there); ``held_paths``: the run's
    files already there (its checkpoints, its best student): replaced, not added to."""
    cfg = distiller.cfg
    student = student_bytes + 256 * 1024 if student_bytes else 0  # the header: names, recipe, block map, settings
    n = cfg.steps // cfg.checkpoint_every + 1 if cfg.checkpoint_every else 1  # + the one written when stopped
    keep = cfg.keep_checkpoints
    sizes = sorted((os.path.getsize(p) for p in held_paths if os.path.isfile(p)), reverse=True)
    plan = disk_plan(out, checkpoint=distiller.checkpoint_bytes(), keep=keep, checkpoints=n, student=student,
                     best=student if best else 0, already=sum(sizes[:keep + 1] if keep else sizes))
    fixes = ["free space on that disk", f"{names['out']} on a larger disk"]
    if keep != 1 and n > 1:
        fixes.insert(1, f"keep one checkpoint ({names['keep']} 1)")
    if cfg.ema_decay > 0:
        fixes.insert(1, f"no EMA ({names['ema']} 0: {human_bytes(distiller.trainable_params * 4)} less per "
                        "checkpoint)")
    check_disk(plan, fixes=fixes, node=node, input_name="out" if names is FLAG_NAMES else "keep_checkpoints")
    return plan


def open_folder(out: str, *, resume: str, distiller, key: str, identity: dict, shards: dict | None,
                student_bytes: int, best: bool, settings: dict) -> dict:
    """On rank 0: refuse another run's folder (naming the differences, the shards that changed), decide what to
    resume from (``resume``: auto, none, or a checkpoint file or folder), check the disk; then, and only then,
    create the folder, remove half-written files a killed process left, and write run.json. Returns {"done":
    this run's finished student or None, "resume": checkpoint or None, "why": ..., "disk": the disk figures}."""
    d = distiller
    held = run_files(out)
    if resume == "none" and held:
        raise RunFolderError(f"the output folder already holds a run ({', '.join(held[:4])}) and resume is none",
                             "pick an empty folder, or resume auto to continue that run", path=out,
                             input_name="resume")
    explicit = resume not in ("auto", "none")
    path = latest_checkpoint(resume) if explicit else None
    conflict = earlier_run(out, identity, key, config=d.cfg, global_batch=d.cfg.batch_size * d.world_size,
                           data=d.data, structure=d.st.describe(), trainable=d.train_names)
    record = read_run_file(out) or {}
    if conflict:
        what, diff = conflict
        old = record.get("data_shards")
        if old and shards is not None and any(x.startswith("--data ") for x in diff):
            diff = [x for x in diff if not x.startswith("--data ")] + \
                [f"--data: {c}" for c in changed_shards(old, shards) or ["the samples' shapes or count"]]
        if not (explicit and os.path.dirname(os.path.abspath(path)) == out):
            raise RunFolderError(f"the output folder holds another run ({what}); differences: {'; '.join(diff)}",
                                 "pick another output folder (nothing of an earlier run is overwritten or mixed), or "
                                 "put the data and settings back as they were; to go on with changed settings, "
                                 f"resume from that folder explicitly (--resume {out})", path=out, input_name="out")
        log.warning("resuming this run with changed settings or data: %s", "; ".join(diff))
        record.setdefault("changes", []).append(diff)
    done = finished_student(out, d.cfg.steps, key) if resume == "auto" else None
    if done:
        return {"done": done, "resume": None, "why": "", "disk": ""}
    if resume == "auto":
        found = checkpoints_in(out)
        path = found[-1][2] if found else None
    why = "asked for" if explicit else "the latest checkpoint of this run in --out" if path else "a new run"
    plan = plan_run_disk(out, d, student_bytes=student_bytes, best=best,
                         held_paths=[p for _, _, p in checkpoints_in(out)] + [os.path.join(out, BEST)])
    # every check passed: only now is anything written
    os.makedirs(out, exist_ok=True)
    gone = clean_partial(out)
    if gone:
        log.info("removed %d half-written file(s) a stopped process left in %s: %s", len(gone), out, ", ".join(gone))
    record.update(run=key, identity=identity, data_shards=shards, settings=settings)
    write_run_file(out, record)
    return {"done": None, "resume": path, "why": why, "disk": plan.describe()}
