"""Resumable checkpoints: one safetensors file with the trained student, AdamW's moments, the EMA, the loss
history, the evaluations and the run's settings in its metadata. Written by rank 0 alone, atomically, never
over a file; read by every rank. A checkpoint records the global batch (batch size x processes), so it resumes
at any scale, the run it belongs to (:func:`run_key`), and the digest of every shard of a streamed dataset, so a
resume on data changed since is refused naming the shard.

Bounded disk: with ``keep_checkpoints`` N, once a checkpoint is completely written the run's checkpoints of
earlier steps beyond the newest N are deleted (only files whose metadata names this same run; never a student
file). :func:`size` is what one checkpoint weighs, from the trained parameters, AdamW's moments and the EMA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os

import torch

from ...files.weights import save_new
from ..eval_hook import HELDOUT_KD
from .config import REPRODUCING
from .errors import CheckpointError
from .fingerprint import changed_shards

log = logging.getLogger("distilled_unets")

CHECKPOINT_FORMAT = "distilled_unets.distill_checkpoint"
CHECKPOINT_VERSION = "1"


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], directory: str, stem: str) -> str:
    """Write ``<stem>.safetensors`` (``<stem>_1`` ... if taken) atomically; never overwrites a file."""
    try:
        return save_new(tensors, directory, lambda n: f"{stem}{'' if n == 0 else f'_{n}'}.safetensors", metadata,
                        tries=1000)
    except FileExistsError as e:
        raise CheckpointError(f"no free checkpoint name for {stem} in {directory}", "clean up the folder") from e


def read_checkpoint_meta(path: str) -> dict[str, str]:
    """The metadata of a distillation checkpoint, every field the run reads checked (a typed error naming the file
    when one is missing or of the wrong type)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint: {e}", "pick a checkpoint this node wrote",
                              path=path, input_name="resume_from") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("the file is not a distillation checkpoint of this pack",
                              "pick a checkpoint written by DistillStudentUNet", path=path, input_name="resume_from")
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"the checkpoint's metadata is damaged: {problem}",
                              "resume from another checkpoint of the run (this one was edited or corrupted)",
                              path=path, input_name="resume_from")
    return meta


def _meta_problem(meta: dict[str, str]) -> str | None:
    """What is wrong with a checkpoint's metadata fields (None when every field the run reads is usable)."""
    def count(v) -> bool:
        try:
            return int(v) >= 0
        except (TypeError, ValueError):
            return False

    def doc(v, kind) -> bool:
        try:
            return isinstance(json.loads(v), kind)
        except (TypeError, ValueError, RecursionError):
            return False

    if not count(meta.get("step")):
        return f"step {str(meta.get('step'))[:20]!r} is not a step number"
    for k in ("optimizer_steps", "ema_updates", "global_batch", "world_size"):
        if k in meta and not count(meta[k]):
            return f"{k} {meta[k][:20]!r} is not a count"
    if not doc(meta.get("config"), dict):
        return "config is not the run's settings (a JSON object)"
    if "global_batch" not in meta and not count(json.loads(meta["config"]).get("batch_size")):
        return "it records no batch size"
    for k, kind, item in (("trainable", list, str), ("skipped_steps", list, int), ("scaler", dict, object)):
        if k in meta and not (doc(meta[k], kind) and all(isinstance(x, item) and not isinstance(x, bool)
                                                         for x in json.loads(meta[k]))):
            return f"{k} is not a JSON {kind.__name__}" + (f" of {item.__name__}" if item is not object else "")
    try:
        float(meta.get("heldout_before", "nan"))
    except ValueError:
        return "heldout_before is not a number"
    return None


def differences(meta: dict[str, str], config, global_batch: int) -> list[str]:
    """The settings of ``config`` (and the global batch) that differ from a checkpoint's, by name: empty when a
    run resumed from it reproduces the uninterrupted one (the data aside: compare ``meta["data"]``)."""
    old, new = json.loads(meta["config"]), json.loads(config.to_json())
    defaults = {f.name: f.default for f in dataclasses.fields(config)}  # settings added since the checkpoint
    diff = [k for k in REPRODUCING if old.get(k, defaults.get(k)) != new.get(k)]
    old_global = int(meta.get("global_batch", old.get("batch_size", 0)))
    if old_global != global_batch:
        diff.insert(0, f"global batch ({old_global} -> {global_batch})")
    return diff


def run_key(config, global_batch: int, data_fingerprint: str, structure: str, trainable: list[str]) -> str:
    """What makes two runs the same run: every reproducing setting, the global batch (however it is split over
    processes), the data, the student's structure and what trains (the step count, checkpointing and evaluation
    settings aside)."""
    c = json.loads(config.to_json())
    for k in ("steps", "checkpoint_every", "checkpoint_prefix", "heldout_every", "keep_checkpoints", "batch_size",
              "selective_recompute", "ema_on_host"):
        c.pop(k, None)
    raw = json.dumps([c, global_batch, data_fingerprint, structure, trainable], sort_keys=True)
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def data_changes(meta: dict[str, str], data) -> list[str]:
    """How ``data`` differs from the data a checkpoint was trained on (empty: the same). A streamed dataset is
    compared shard by shard (content digests); a checkpoint written before digests were recorded, by shard
    names, sizes and sample shapes."""
    if "data_shards" in meta and hasattr(data, "shard_digests"):
        return changed_shards(json.loads(meta["data_shards"]), data.shard_digests())
    if "data_shards" not in meta and hasattr(data, "layout_fingerprint"):
        return [] if meta.get("data") == data.layout_fingerprint() else ["the training data differ"]
    return [] if meta.get("data") == data.fingerprint() else ["the training data differ"]


def evaluations_of(meta: dict[str, str], keys: set[str], get, path: str | None = None) -> list[dict]:
    """The evaluations a checkpoint holds ({"step": s, metric: value, ...}); a checkpoint written before
    evaluations were recorded has its held-out error curve as ``history.heldout``. A damaged record is a
    :class:`CheckpointError` naming the file."""
    if "evaluations" in meta:
        try:
            got = json.loads(meta["evaluations"])
            out = [{str(k): (int(v) if k == "step" else float(v)) for k, v in e.items()} for e in got]
            if not all("step" in e for e in out):
                raise ValueError("an evaluation without its step")
            return out
        except (ValueError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"the checkpoint's evaluations are damaged ({type(e).__name__})",
                                  "resume from another checkpoint of the run", path=path,
                                  input_name="resume_from") from e
    if "history.heldout" in keys:
        return [{"step": int(a), HELDOUT_KD: float(b)} for a, b in get("history.heldout").tolist()]
    return []


def _history(f, path: str) -> tuple[list[float], dict[str, list[float]], list[tuple[int, float]]]:
    """(loss per step, each loss term per step, held-out curve) of an open checkpoint, checked: one value per step."""
    keys = set(f.keys())

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint's loss history is damaged ({what})", "resume from another checkpoint "
                               "of the run", path=path, input_name="resume_from")

    def steps(k: str) -> list[float]:
        t = f.get_tensor(k)
        if t.ndim != 1 or not t.is_floating_point():
            raise damaged(f"{k} is not one value per step")
        return t.tolist()

    if "history.loss" not in keys:
        raise damaged("no history.loss")
    losses = steps("history.loss")
    parts = {k[len("history."):]: steps(k) for k in sorted(keys)
             if k.startswith("history.") and k not in ("history.loss", "history.heldout")}
    if any(len(v) != len(losses) for v in parts.values()):
        raise damaged("the loss terms cover other steps than the loss")
    curve = []
    if "history.heldout" in keys:
        t = f.get_tensor("history.heldout")
        if t.ndim != 2 or t.shape[1] != 2 or not t.is_floating_point() or not bool(torch.isfinite(t[:, 0]).all()):
            raise damaged("history.heldout is not (step, error) pairs")
        curve = [(int(a), float(b)) for a, b in t.tolist()]
    return losses, parts, curve


def read_history(path: str) -> tuple[list[float], dict[str, list[float]], list[int]]:
    """(loss per step, each loss term per step, the skipped steps) a checkpoint holds, from its first step."""
    from safetensors import safe_open

    meta = read_checkpoint_meta(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        losses, parts, _ = _history(f, path)
    return losses, parts, [int(s) for s in json.loads(meta.get("skipped_steps", "[]"))]


def read_evaluations(path: str) -> list[dict]:
    """The evaluations a checkpoint holds, from the first ({"step": s, metric: value, ...})."""
    from safetensors import safe_open

    meta = read_checkpoint_meta(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        return evaluations_of(meta, set(f.keys()), f.get_tensor, path)


def _tensors(run, model, step: int) -> tuple[dict, dict]:
    tensors = {f"student.{k}": v for k, v in model.state_dict().items()}
    for name, p in zip(run.train_names, run._params):
        st = run._opt.state.get(p, {})
        if "exp_avg" in st:
            tensors[f"optim.{name}.exp_avg"] = st["exp_avg"]
            tensors[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"]
        if run._ema is not None:
            tensors[f"ema.{name}"] = run._ema[name]
    tensors["history.loss"] = torch.tensor(run._losses, dtype=torch.float64)
    for k, v in run._parts.items():
        tensors[f"history.{k}"] = torch.tensor(v, dtype=torch.float64)
    opt_steps = 0
    for p in run._params:
        s = run._opt.state.get(p, {}).get("step")
        if s is not None:
            opt_steps = int(s)
            break
    return tensors, _meta(run, step, opt_steps)


def _meta(run, step: int, opt_steps: int) -> dict[str, str]:
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": str(step),
            "optimizer_steps": str(opt_steps), "ema_updates": str(run._ema_updates),
            "config": run.cfg.to_json(), "data": run.data.fingerprint(), "run": run.run_id,
            "global_batch": str(run.cfg.batch_size * run.world_size), "world_size": str(run.world_size),
            "skipped_steps": json.dumps(run._skipped),
            "heldout_before": repr(run._heldout_before),
            "evaluations": json.dumps(run._evals), "best": json.dumps(run._best),
            "scaler": json.dumps(run._scaler.state_dict() if run._scaler is not None else {}),
            "teacher_structure": run.tt.describe(), "student_structure": run.st.describe(),
            "trainable": json.dumps(run.train_names)}
    if hasattr(run.data, "shard_digests"):
        meta["data_shards"] = json.dumps(run.data.shard_digests(), sort_keys=True)
    return meta


def student_bytes(run) -> int:
    """Bytes of the student as the run holds it (trained parameters fp32, frozen ones in the compute dtype,
    buffers as they are): one checkpoint's ``student.*`` tensors, one best-weights copy."""
    frozen = torch.finfo(run.autocast or torch.float32).bits // 8
    train = set(run.train_names)
    names = dict(run.student.named_parameters())
    total = 0
    for k, v in run.student.state_dict(keep_vars=True).items():
        item = 4 if k in names and k in train else frozen if k in names and v.is_floating_point() else v.element_size()
        total += v.numel() * item
    return total


def size(run, steps: int) -> int:
    """Bytes of one checkpoint of ``run`` written at ``steps``: exact for the tensors (the student as the run
    holds it: trained parameters fp32, frozen ones in the compute dtype; AdamW's two fp32 moments and the fp32
    EMA of every trained parameter; the loss history), the safetensors header estimated from the names,
    shapes and settings it records (a few KB to a few hundred KB)."""
    frozen = torch.finfo(run.autocast or torch.float32).bits // 8
    train = set(run.train_names)
    tensor_bytes, header = 0, 0
    names = dict(run.student.named_parameters())
    for k, v in run.student.state_dict(keep_vars=True).items():
        if k in names and k in train:
            item = 4
        elif k in names and v.is_floating_point():
            item = frozen
        else:
            item = v.element_size()
        tensor_bytes += v.numel() * item
        header += len(k) + 8 + len(str(list(v.shape))) + 56
    per_param = 8 + (4 if run.cfg.ema_decay > 0 else 0)  # AdamW exp_avg + exp_avg_sq, EMA
    tensor_bytes += run.trainable_params * per_param
    for n in run.train_names:
        shape = len(str(list(names[n].shape)))
        header += (len(n) + 14 + shape + 56) * 2 + ((len(n) + 4 + shape + 56) if run.cfg.ema_decay > 0 else 0)
    series = 1 + len(run.loss_terms())
    tensor_bytes += 8 * steps * series
    header += series * 90
    meta_len = len(json.dumps(run.train_names)) + len(run.cfg.to_json()) + 1024
    meta_len += len(json.dumps(getattr(run.data, "_digests", None) or {})) or 48 * len(getattr(run.data, "files", []))
    return tensor_bytes + header + meta_len + 8


def prune(run, written: str, step: int) -> list[str]:
    """After ``written`` (at ``step``) is complete: delete this run's checkpoints of earlier steps in the
    checkpoint folder beyond the newest ``keep_checkpoints`` (counting ``written``). Returns what was deleted."""
    keep = run.cfg.keep_checkpoints
    folder = run.cfg.checkpoint_dir
    if not keep or not folder or not os.path.isdir(folder):
        return []
    older = []
    for f in os.listdir(folder):
        path = os.path.join(folder, f)
        if f.startswith(".") or not f.endswith(".safetensors") or os.path.samefile(path, written):
            continue
        try:
            meta = read_checkpoint_meta(path)
        except CheckpointError:
            continue
        s = int(meta.get("step", "-1"))
        if meta.get("run") == run.run_id and s < step:
            older.append((s, os.path.getmtime(path), path))
    older.sort()
    doomed = older[:max(0, len(older) - (keep - 1))]
    gone = []
    for _, _, path in doomed:
        try:
            os.remove(path)
            gone.append(path)
        except OSError as e:
            log.warning("could not delete the old checkpoint %s (%s)", path, e)
    if gone:
        log.info("deleted %d older checkpoint(s) of this run (keep_checkpoints %d): %s", len(gone), keep,
                 ", ".join(os.path.basename(p) for p in gone))
    return gone


def write(run, model, step: int) -> str:
    """Save the run at ``step``; returns the file written."""
    tensors, meta = _tensors(run, model, step)
    path = _atomic_save({k: v.detach().contiguous() for k, v in tensors.items()}, meta, run.cfg.checkpoint_dir,
                        f"{run.cfg.checkpoint_prefix}_{step:07d}")
    log.info("distillation checkpoint at step %d: %s", step, path)
    prune(run, path, step)
    return path


def restore(run, model, path: str, *, allow_changed_data: bool = False) -> tuple[int, list[str]]:
    """Load a checkpoint into the run and its trained copy; returns (step, notes about what differs). Data
    changed since the checkpoint are refused unless ``allow_changed_data`` (then noted)."""
    from safetensors import safe_open

    meta = read_checkpoint_meta(path)
    notes = []
    step = int(meta["step"])
    if step > run.cfg.steps:  # at ``steps`` exactly: nothing left to train, the run finishes from it
        raise CheckpointError(f"the checkpoint is at step {step}, the run asks for {run.cfg.steps} steps",
                              f"set steps to {step} or more", path=path, input_name="steps")
    names = json.loads(meta.get("trainable", "[]"))
    if names != run.train_names:
        raise CheckpointError("the checkpoint trained a different set of student parameters",
                              "resume with the same student and 'train' choice", path=path, input_name="resume_from")
    diff = differences(meta, run.cfg, run.cfg.batch_size * run.world_size)
    if diff:
        notes.append("settings changed since the checkpoint (the run will not reproduce an uninterrupted "
                     "one): " + ", ".join(diff))
    changed = data_changes(meta, run.data)
    if changed and not allow_changed_data:
        raise CheckpointError(f"the training data changed since the checkpoint was written: {', '.join(changed[:5])}"
                              + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""),
                              "put the data back as they were when the checkpoint was written, or start a new run "
                              "(to go on training on the new data, start from the distilled student file instead "
                              "of the checkpoint)", path=path, input_name="resume_from")
    if changed:
        notes.append("the training data differ from the checkpoint's: " + ", ".join(changed[:5]))
    sd = model.state_dict()
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = [k for k in sd if f"student.{k}" not in keys]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} student weights (e.g. {missing[0]})",
                                  "resume with the same student model", path=path, input_name="resume_from")

        def tensor(key: str, like: torch.Tensor) -> torch.Tensor:
            """A tensor of the checkpoint that must have ``like``'s shape and hold usable values."""
            t = f.get_tensor(key)
            if t.shape != like.shape:
                raise CheckpointError(f"'{key}' has shape {tuple(t.shape)} in the checkpoint, {tuple(like.shape)} in "
                                      "the student", "resume with the same student", path=path,
                                      input_name="resume_from")
            # the norm test of the run's own non-finite check (step.check_weights_finite): NaN, inf, or out of range
            if t.is_floating_point() and not math.isfinite(float(torch.linalg.vector_norm(t.float()))):
                raise CheckpointError(f"'{key}' holds NaN, infinite or out-of-range values; the checkpoint is damaged",
                                      "resume from another checkpoint of the run", path=path, input_name="resume_from")
            return t.to(like.dtype)

        losses, parts, _ = _history(f, path)  # (the held-out curve of an old checkpoint: evaluations_of)
        if len(losses) != step:
            raise CheckpointError(f"the checkpoint is at step {step} but holds the loss of {len(losses)} steps",
                                  "resume from another checkpoint of the run", path=path, input_name="resume_from")
        with torch.no_grad():
            for k, v in sd.items():
                v.copy_(tensor(f"student.{k}", v))
        opt_steps = int(meta.get("optimizer_steps", "0"))
        opt_state = {}
        for i, (name, p) in enumerate(zip(run.train_names, run._params)):
            if f"optim.{name}.exp_avg" in keys:  # load_state_dict puts step/moments where the optimizer wants
                if f"optim.{name}.exp_avg_sq" not in keys:
                    raise CheckpointError(f"the checkpoint has optim.{name}.exp_avg without its exp_avg_sq",
                                          "resume from another checkpoint of the run", path=path,
                                          input_name="resume_from")
                sq = tensor(f"optim.{name}.exp_avg_sq", p)
                if bool((sq < 0).any()):
                    raise CheckpointError(f"optim.{name}.exp_avg_sq holds negative values; the checkpoint is damaged",
                                          "resume from another checkpoint of the run", path=path,
                                          input_name="resume_from")
                opt_state[i] = {"step": torch.tensor(float(opt_steps)), "exp_avg": tensor(f"optim.{name}.exp_avg", p),
                                "exp_avg_sq": sq}
        run._opt.load_state_dict({"state": opt_state, "param_groups": run._opt.state_dict()["param_groups"]})
        for name in run.train_names:
            if run._ema is not None and f"ema.{name}" in keys:
                run._ema[name].copy_(tensor(f"ema.{name}", run._ema[name]))
        run._losses, run._parts = losses, parts
        run._evals = evaluations_of(meta, keys, f.get_tensor, path)
    run._ema_updates = int(meta.get("ema_updates", "0"))
    run._skipped = [int(s) for s in json.loads(meta.get("skipped_steps", "[]"))]
    if run._scaler is not None and meta.get("scaler") not in (None, "{}"):
        try:
            run._scaler.load_state_dict(json.loads(meta["scaler"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's fp16 loss-scaler state is damaged ({type(e).__name__})",
                                  "resume from another checkpoint of the run", path=path,
                                  input_name="resume_from") from e
    run._heldout_before = float(meta.get("heldout_before", "nan"))
    return step, notes
