"""A distillation run set up from ComfyUI MODELs: what ``DistillStudentUNet`` and ``tools/distill.py`` share.

The engine (``models/students/distill``) is host-free; this module turns two MODELs into its inputs: the
prediction types checked, the student's UNet with the weights it samples with (patches merged), the block
map and the parameters that train, the A-SDM VGG term from a weights file, the teacher loaded by ComfyUI's
model management and the memory check against what is free (the container's limit included), and the trained
weights handed back as a MODEL or written as the file ``Load Distilled UNet`` reads.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import torch

from ...models.errors import IncompatibleModelsError, WeightFileError
from ...models.structure.blockmap import BlockMap
from ...models.structure.topology import Topology
from ...models.students import distill as D
from ...models.students.distill import resources
from ...models.students.distill import vgg as V
from .students import SAVE_DTYPES, sampling_of, write_unet
from .unet import (
    BLOCK_MAP_KEY,
    RECIPE_KEY,
    block_map_of_model,
    model_from_state_dict,
    node_errors,
    topology_of,
    unet_from_state_dict,
    unet_weights,
)

log = logging.getLogger("distilled_unets")


def student_unet_for_training(student, topology: Topology):
    """The student's UNet with the weights it samples with (LoRAs and other weight patches merged), without
    changing the MODEL."""
    patched = bool(student.patches) or bool(getattr(student, "weight_wrapper_patches", None))
    if not patched:
        return student.model.diffusion_model
    return unet_from_state_dict(topology, unet_weights(student))


def block_map_for(student, teacher_topology: Topology, student_topology: Topology) -> tuple[BlockMap, str]:
    """(block map, where it came from): the MODEL's own when it fits the two structures, else derived."""
    return D.choose_block_map(block_map_of_model(student), teacher_topology, student_topology)


def check_predictions(teacher, student, node: str) -> tuple[str, bool]:
    """(prediction, zero terminal SNR) shared by teacher and student; a typed error when they differ."""
    with node_errors(node, "teacher"):
        pred_t, zsnr_t = sampling_of(teacher, node, "teacher")
    with node_errors(node, "student"):
        pred_s, zsnr_s = sampling_of(student, node, "student")
    if (pred_t, zsnr_t) != (pred_s, zsnr_s):
        raise IncompatibleModelsError(f"the teacher predicts {pred_t}{' (zero terminal SNR)' if zsnr_t else ''}, "
                                      f"the student {pred_s}{' (zero terminal SNR)' if zsnr_s else ''}",
                                      "distil a student of the same prediction type as its teacher (set the "
                                      "loader's prediction input, or a ModelSamplingDiscrete node on both)",
                                      node=node, input_name="student")
    return pred_t, zsnr_t


def read_vgg16(path: str, *, node: str, input_name: str):
    """A frozen torchvision VGG16 (A-SDM's VGG term) from a weights file, read weights-only and checked."""
    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:
        raise WeightFileError(f"the VGG16 file cannot be read ({type(e).__name__}: {str(e)[:160]})",
                              "use a .safetensors (or weights-only .pth) torchvision VGG16 file", path=path,
                              node=node, input_name=input_name) from e
    with node_errors(node, input_name):
        return V.load_vgg16(tensors, path=path)


def vgg_loss(path: str, teacher, weights: D.LossWeights, *, node: str, input_name: str):
    """(A-SDM's VGG term from a torchvision VGG16 weights file, one report line). Weights-only loading."""
    vgg = read_vgg16(path, node=node, input_name=input_name)
    fmt = teacher.model.latent_format
    if getattr(fmt, "latent_rgb_factors", None) is None:
        raise D.DistillError("this model family has no latent->RGB preview factors for the VGG input",
                             f"leave {input_name} out", node=node, input_name=input_name)
    semantic = V.SemanticVGGLoss(vgg, fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None))
    note = (f"VGG term ({os.path.basename(path)}): relu1_2/2_2/3_3 of VGG16 on the student's and the teacher's "
            "predicted x0, mapped to RGB with the family's latent preview factors, ImageNet-normalised; relative "
            f"feature error, weighted by alpha_bar_t; weight {weights.vgg_weight:g}")
    return semantic, note


@dataclass
class Run:
    """A distillation run made from two MODELs (see :func:`make_run`)."""

    distiller: D.Distiller
    teacher_topology: Topology
    student_topology: Topology
    block_map: BlockMap
    block_map_note: str
    units: set[str]
    prediction: str
    zsnr: bool
    student_unet: torch.nn.Module


def make_run(teacher, student, data, heldout, config: D.DistillConfig, *, train: str, device, node: str,
             semantic=None, **engine) -> Run:
    """The engine's :class:`Distiller` for a teacher and a student MODEL (only read) on prepared data;
    ``engine``: the evaluation arguments (``evaluator``, ``eval_schedule``, ``on_eval``, ``save_best``)."""
    tt, st = topology_of(teacher), topology_of(student)
    pred, zsnr = check_predictions(teacher, student, node)
    bm, bm_note = block_map_for(student, tt, st)
    with node_errors(node, "train"):
        trainable, units = D.trainable_filter(bm, train)
    unet = student_unet_for_training(student, st)
    tmodel = teacher.model
    with node_errors(node, "train"):
        d = D.Distiller(teacher=tmodel.diffusion_model, student=unet, teacher_topology=tt, student_topology=st,
                        schedule=D.NoiseSchedule(teacher.get_model_object("model_sampling"), prediction=pred),
                        data=data, heldout=heldout, config=config, trainable=trainable, semantic=semantic,
                        device=device, teacher_dtype=tmodel.manual_cast_dtype or tmodel.get_dtype(), node=node,
                        **engine)
    return Run(d, tt, st, bm, bm_note, units, pred, zsnr, unet)


def own_blocks_fix(run: Run, train: str) -> list[str]:
    """The 'train only the student's own blocks' fix for a memory refusal, where it applies."""
    if train != "all":
        return []
    own = set(run.block_map.trainable_units("student blocks only"))
    n_own = sum(p.numel() for n, p in run.student_unet.named_parameters() if run.block_map.unit_of(n) in own)
    if not n_own:
        return []
    return [f"train 'student blocks only' ({n_own:,} parameters instead of {run.distiller.trainable_params:,})"]


def load_teacher_and_check_memory(run: Run, teacher, device, *, comfy_free=None, force_full_load: bool = False,
                                  extra_fixes: list[str] | None = None, processes: int | None = None,
                                  options: dict[str, str] | None = None):
    """Load the teacher through ComfyUI's model management (it frees what the run needs), then check the
    engine's estimate against what is left: the lower of ComfyUI's figure (``comfy_free(device)``, by default
    ``mm.get_free_memory``) and the pack's own reading (the GPU's free memory, or on the CPU the RAM the
    process's container leaves; ``processes`` on one machine share it); ``options``: the memory options the
    caller offers, by name (see ``Distiller.check_memory``). Returns (estimate, free bytes, what the free
    figure is)."""
    d = run.distiller
    est = d.estimate_memory(teacher_resident=True)
    kw = {"force_full_load": True} if force_full_load else {}
    mm.load_models_gpu([teacher], memory_required=est.total, **kw)
    host_free = (comfy_free or mm.get_free_memory)(device)
    free, where = resources.free_memory(device, host_free)
    d.check_memory(free, teacher_resident=True, extra_fixes=extra_fixes, processes=processes, where=where,
                   options=options)
    return est, free, where


def trained_model(run: Run, state: dict, recipe: dict, student=None):
    """The trained weights as a new MODEL (the student's sampling patch carried over)."""
    trained = model_from_state_dict(run.student_topology, state, prediction=run.prediction, zsnr=run.zsnr,
                                    attachments={BLOCK_MAP_KEY: run.block_map, RECIPE_KEY: recipe})
    if student is not None and "model_sampling" in student.object_patches:
        trained.add_object_patch("model_sampling", student.get_model_object("model_sampling"))
    return trained


def recipe_after(student, res, config: D.DistillConfig, *, train: str, processes: int = 1, made_by: str) -> dict:
    """The student's recipe with this run appended to its ``distilled`` list (what the loader's info shows)."""
    recipe = dict(student.get_attachment(RECIPE_KEY) or {}) if hasattr(student, "get_attachment") else {}

    def finite(v):
        return v if isinstance(v, float) and math.isfinite(v) else None

    recipe["distilled"] = list(recipe.get("distilled", [])) + [{
        "steps": res.steps_done, "samples_seen": res.steps_done * config.batch_size * processes * config.grad_accum,
        "batch_size": config.batch_size, "processes": processes, "gradient_accumulation": config.grad_accum,
        "learning_rate": config.learning_rate, "loss_weights": config.weights.describe(),
        "feature_points": config.features, "train": train, "seed": config.seed, "ema_decay": config.ema_decay,
        "heldout_before": finite(res.heldout_before), "heldout_after": finite(res.heldout_after), "best": res.best,
        "made_by": made_by}]
    return recipe


def student_file_bytes(run: Run, dtype: str) -> int:
    """The tensor bytes of the student saved in ``dtype`` (every tensor is cast to it)."""
    return sum(v.numel() for v in run.student_unet.state_dict().values()) * torch.finfo(SAVE_DTYPES[dtype]).bits // 8


def check_finite_weights(state: dict, *, node: str, input_name: str = "lr") -> None:
    """Refuse to write non-finite weights: NonFiniteError naming the first bad tensor."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise D.NonFiniteError(f"{len(bad)} of {len(state)} student tensors hold NaN or infinite values (first: "
                               f"{bad[0]}); no student file was written",
                               "resume from the last good checkpoint with a lower learning rate or bf16/fp32 "
                               "precision, and check the data for NaN/inf", node=node, input_name=input_name)


def write_student(folder: str, state: dict, *, topology: Topology, prediction: str, zsnr: bool,
                  block_map: BlockMap | None, recipe: dict, dtype: str, title: str, name_for,
                  metadata: dict[str, str] | None = None, replace: str | None = None, node: str = "") -> str:
    """Write trained weights as the file ``Load Distilled UNet`` reads (ComfyUI's ModelSave layout, recipe, block
    map, prediction type): ``folder/name_for(n)``, never over a file; or, with ``replace``, written under a
    temporary name and renamed over ``folder/replace`` (a reader sees the old file or the new one, never half
    of one). Refuses non-finite weights before writing anything."""
    check_finite_weights(state, node=node)
    if dtype not in SAVE_DTYPES:
        raise D.DistillError(f"save dtype {dtype!r}", f"use one of {sorted(SAVE_DTYPES)}", node=node,
                             input_name="save_dtype")
    attachments = {RECIPE_KEY: recipe}
    if block_map is not None:
        attachments[BLOCK_MAP_KEY] = block_map
    model = model_from_state_dict(topology, state, prediction=prediction, zsnr=zsnr, weight_dtype="fp32",
                                  attachments=attachments)
    if replace is None:
        return write_unet(model, folder, name_for, dtype, title, extra_metadata=metadata)
    tmp = write_unet(model, folder, lambda n: f".{replace}.{os.getpid()}.{n}.writing", dtype, title,
                     extra_metadata=metadata)
    path = os.path.join(folder, replace)
    os.replace(tmp, path)
    return path


__all__ = ["Run", "make_run", "student_unet_for_training", "block_map_for", "check_predictions", "vgg_loss",
           "own_blocks_fix", "load_teacher_and_check_memory", "trained_model", "write_student",
           "check_finite_weights", "recipe_after", "student_file_bytes"]
