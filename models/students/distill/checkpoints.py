"""Resumable checkpoints: one safetensors file with the trained student, AdamW's moments, the EMA, the loss
history and the run's settings in its metadata. Written by rank 0 alone, atomically, never over a file; read by
every rank. A checkpoint records the global batch (batch size x processes), so it resumes at any scale."""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from ...files.weights import save_new
from .config import REPRODUCING
from .errors import CheckpointError

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
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint: {e}", "pick a checkpoint this node wrote",
                              path=path) from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("the file is not a distillation checkpoint of this pack",
                              "pick a checkpoint written by DistillStudentUNet", path=path)
    return meta


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


def read_history(path: str) -> tuple[list[float], dict[str, list[float]], list[int]]:
    """(loss per step, each loss term per step, the skipped steps) a checkpoint holds, from its first step."""
    from safetensors import safe_open

    meta = read_checkpoint_meta(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        losses = f.get_tensor("history.loss").tolist()
        parts = {k[len("history."):]: f.get_tensor(k).tolist() for k in sorted(keys)
                 if k.startswith("history.") and k not in ("history.loss", "history.heldout")}
    return losses, parts, [int(s) for s in json.loads(meta.get("skipped_steps", "[]"))]


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
    if run._curve:
        tensors["history.heldout"] = torch.tensor(run._curve, dtype=torch.float64)
    opt_steps = 0
    for p in run._params:
        s = run._opt.state.get(p, {}).get("step")
        if s is not None:
            opt_steps = int(s)
            break
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": str(step),
            "optimizer_steps": str(opt_steps), "ema_updates": str(run._ema_updates),
            "config": run.cfg.to_json(), "data": run.data.fingerprint(),
            "global_batch": str(run.cfg.batch_size * run.world_size), "world_size": str(run.world_size),
            "skipped_steps": json.dumps(run._skipped),
            "heldout_before": repr(run._heldout_before),
            "scaler": json.dumps(run._scaler.state_dict() if run._scaler is not None else {}),
            "teacher_structure": run.tt.describe(), "student_structure": run.st.describe(),
            "trainable": json.dumps(run.train_names)}
    return tensors, meta


def write(run, model, step: int) -> str:
    """Save the run at ``step``; returns the file written."""
    tensors, meta = _tensors(run, model, step)
    path = _atomic_save({k: v.detach().contiguous() for k, v in tensors.items()}, meta, run.cfg.checkpoint_dir,
                        f"{run.cfg.checkpoint_prefix}_{step:07d}")
    log.info("distillation checkpoint at step %d: %s", step, path)
    return path


def restore(run, model, path: str) -> tuple[int, list[str]]:
    """Load a checkpoint into the run and its trained copy; returns (step, notes about what differs)."""
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
                              "resume with the same student and 'train' choice", path=path, input_name="resume")
    diff = differences(meta, run.cfg, run.cfg.batch_size * run.world_size)
    if diff:
        notes.append("settings changed since the checkpoint (the run will not reproduce an uninterrupted "
                     "one): " + ", ".join(diff))
    if meta.get("data") != run.data.fingerprint():
        notes.append("the training data differ from the checkpoint's")
    sd = model.state_dict()
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = [k for k in sd if f"student.{k}" not in keys]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} student weights (e.g. {missing[0]})",
                                  "resume with the same student model", path=path, input_name="resume")
        with torch.no_grad():
            for k, v in sd.items():
                t = f.get_tensor(f"student.{k}")
                if t.shape != v.shape:
                    raise CheckpointError(f"'{k}' has shape {tuple(t.shape)} in the checkpoint, "
                                          f"{tuple(v.shape)} in the student", "resume with the same student",
                                          path=path, input_name="resume")
                v.copy_(t)
        opt_steps = int(meta.get("optimizer_steps", "0"))
        opt_state = {}
        for i, name in enumerate(run.train_names):
            if f"optim.{name}.exp_avg" in keys:  # load_state_dict puts step/moments where the optimizer wants
                opt_state[i] = {"step": torch.tensor(float(opt_steps)),
                                "exp_avg": f.get_tensor(f"optim.{name}.exp_avg"),
                                "exp_avg_sq": f.get_tensor(f"optim.{name}.exp_avg_sq")}
        run._opt.load_state_dict({"state": opt_state, "param_groups": run._opt.state_dict()["param_groups"]})
        for name in run.train_names:
            if run._ema is not None and f"ema.{name}" in keys:
                run._ema[name].copy_(f.get_tensor(f"ema.{name}"))
        run._losses = f.get_tensor("history.loss").tolist()
        for k in keys:
            if k.startswith("history.") and k not in ("history.loss", "history.heldout"):
                run._parts[k[len("history."):]] = f.get_tensor(k).tolist()
        if "history.heldout" in keys:
            run._curve = [(int(a), float(b)) for a, b in f.get_tensor("history.heldout").tolist()]
    run._ema_updates = int(meta.get("ema_updates", "0"))
    run._skipped = [int(s) for s in json.loads(meta.get("skipped_steps", "[]"))]
    if run._scaler is not None and meta.get("scaler") not in (None, "{}"):
        run._scaler.load_state_dict(json.loads(meta["scaler"]))
    run._heldout_before = float(meta.get("heldout_before", "nan"))
    return step, notes
