"""Students as ComfyUI MODELs, shared by the student nodes, the distillation node and the headless trainer: a
model's prediction type, a student built from a teacher by preset (BK-SDM / SDXL presets, A-SDM combinations,
CondConv), and a UNet written as the file ``Load Distilled UNet`` reads back (ComfyUI's ModelSave layout, the
pack's metadata). The recipes and the copy rule live in ``models/students/builder.py``."""

from __future__ import annotations

import json
import logging

import comfy.model_sampling
import torch

from ...models.errors import IncompatibleModelsError, PackError
from ...models.files.loader import META_BLOCK_MAP, META_PREDICTION, META_RECIPE
from ...models.files.weights import save_new
from ...models.patches.condconv import PARAM_NAMES, CondConv2d
from ...models.students import builder
from .patcher import expected_shapes
from .unet import (
    BLOCK_MAP_KEY,
    RECIPE_KEY,
    block_map_of_model,
    comfy_model,
    model_from_state_dict,
    topology_of,
    unet_weights,
)

log = logging.getLogger("distilled_unets")

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PACK_VERSION = "distilled-unets 0.2.0"


def sampling_of(patcher, node: str, input_name: str) -> tuple[str, bool]:
    """(prediction, zero-terminal-SNR) of a MODEL as it samples (object patches such as ModelSamplingDiscrete
    included); other prediction types are refused."""
    ms = patcher.get_model_object("model_sampling")
    discrete = isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
    ms_types = comfy.model_sampling
    if discrete and isinstance(ms, ms_types.V_PREDICTION) and not isinstance(ms, ms_types.EDM):
        pred = "v_prediction"
    elif discrete and isinstance(ms, ms_types.EPS) and not isinstance(ms, (ms_types.V_PREDICTION, ms_types.X0)):
        pred = "eps"
    else:
        raise IncompatibleModelsError(f"the model samples as {type(ms).__name__}, not epsilon or v-prediction",
                                      "use an SD 1.x / 2.x / SDXL model with epsilon or v-prediction sampling",
                                      node=node, input_name=input_name)
    return pred, bool(getattr(ms, "zsnr", False))


def add_condconv(p, sd: dict, origin: dict, teacher_sd: dict, experts: int, seed: int = 0) -> tuple[dict, list[str]]:
    """Turn the 3x3 convolutions of the student's shallowest down and up stage into A-SDM's CLME-CondConv with
    ``experts`` experts (in place in ``sd``); returns (recipe entry, info lines)."""
    plan_cc = builder.condconv_sources(p, {k: tuple(v.shape) for k, v in teacher_sd.items()},
                                       {k: tuple(v.shape) for k, v in sd.items()})
    g = torch.Generator().manual_seed(seed)
    layers, lines = {}, []
    for path, extras in plan_cc.items():
        extras = extras[:experts - 1]
        w, b = sd[f"{path}.weight"], sd.get(f"{path}.bias")
        cc = CondConv2d.from_conv(
            w, b, [teacher_sd[f"{x}.weight"] for x in extras], num_experts=experts, generator=g,
            extra_biases=[teacher_sd.get(f"{x}.bias") for x in extras], source="its own (teacher) kernel",
            extra_sources=[f"teacher {x}" for x in extras], padding=1)
        for name in PARAM_NAMES:
            t = getattr(cc, name)
            if t is not None:
                sd[f"{path}.{name}"] = t.detach().clone()
        origin[f"{path}.routing_weight"] = origin[f"{path}.routing_bias"] = "new"
        layers[path] = list(cc.expert_sources)
        lines.append(f"  {path}: " + "; ".join(cc.expert_sources))
    head = (f"CondConv (A-SDM CLME-CondConv): {len(layers)} 3x3 convolutions of the shallowest down and up stage "
            f"hold {experts} experts each: the layer's own kernel, the teacher's kernels of the layers the student "
            "merged away (where their shapes fit), then random ones; the routing starts at 0 (every gate 1/2) and "
            "expert 1 is 2W minus the others, so the untrained student computes exactly what it did without "
            "CondConv (distillation trains the experts and the routing)")
    return {"experts": experts, "layers": layers}, [head, *lines]


def build_student(teacher, preset: str, base_student=None, teacher_name: str = "", *, condconv_experts: int = 0,
                  seed: int = 0):
    """(student MODEL, info) — the teacher and the base student are only read."""
    node = builder.NODE
    p = builder.plan(preset, topology_of(teacher), topology_of(base_student) if base_student is not None else None)
    pred, zsnr = sampling_of(teacher, node, "teacher")
    t_sd = unet_weights(teacher)
    b_sd = unet_weights(base_student) if base_student is not None and p.preset.needs_base else None
    with torch.device("meta"):
        want = expected_shapes(comfy_model(p.student, torch.float32, device="meta").diffusion_model)
    try:
        sd, origin = builder.student_state_dict(p, want, t_sd, b_sd, seed=seed)
    except ValueError as e:  # a source tensor of an unexpected shape: the teacher is not what it claims
        raise PackError(f"the teacher's weights do not fit its structure ({e})",
                        "connect an unmodified SD 1.x / 2.x / SDXL checkpoint's MODEL", node=node,
                        input_name="teacher") from e
    recipe = {"preset": p.preset.name, "teacher": teacher_name.strip() or None, "family": p.teacher.family,
              "teacher_sha256": builder.weights_sha256(t_sd), "source": p.preset.source, "made_by": PACK_VERSION}
    if p.layer_note:
        recipe["kept_layers"] = p.layer_note
    cc_lines = []
    if condconv_experts:
        recipe["condconv"], cc_lines = add_condconv(p, sd, origin, t_sd, condconv_experts, seed)
    student = model_from_state_dict(p.student, sd, prediction=pred, zsnr=zsnr,
                                    attachments={BLOCK_MAP_KEY: p.block_map, RECIPE_KEY: recipe})
    if "model_sampling" in teacher.object_patches:  # e.g. a ModelSamplingDiscrete node on the teacher
        student.add_object_patch("model_sampling", teacher.get_model_object("model_sampling"))
    report = builder.build_report(p, origin, teacher_name.strip())
    if cc_lines:
        report = report.replace(builder.NOT_DISTILLED, "\n".join(cc_lines) + "\n" + builder.NOT_DISTILLED)
    return student, report



def save_metadata(patcher, title: str) -> tuple[dict, dict]:
    """(metadata, extra top-level tensors) as ComfyUI's ModelSave writes them, plus the pack's own keys."""
    pred, zsnr = sampling_of(patcher, "SaveStudentUNet", "model")
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm", "modelspec.title": title,
            "modelspec.predict_key": "v" if pred == "v_prediction" else "epsilon", META_PREDICTION: pred}
    extra = {}
    if pred == "v_prediction":
        extra["v_pred"] = torch.tensor([])
        if zsnr:
            extra["ztsnr"] = torch.tensor([])
    recipe = patcher.get_attachment(RECIPE_KEY) if hasattr(patcher, "get_attachment") else None
    if recipe:
        meta[META_RECIPE] = json.dumps(recipe)
    bm = block_map_of_model(patcher)
    if bm is not None:
        meta[META_BLOCK_MAP] = bm.to_json()
    return meta, extra


def _non_finite(tensors: dict) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def refuse_non_finite(sd: dict, weights: dict, dtype: str) -> None:
    """Never a file with NaN or infinite weights: a typed error naming the first bad tensor, before anything is
    written (``sd``: the tensors as they would be saved, ``weights``: the model's own)."""
    bad = _non_finite(sd)
    if not bad:
        return
    own = _non_finite(weights)
    if own:
        raise PackError(f"{len(own)} of {len(weights)} weight tensors hold NaN or infinite values (first: {own[0]}); "
                        "nothing was written", "distil again with a lower learning_rate or bf16/fp32 precision, or "
                        "save the model the run started from", node="SaveStudentUNet", input_name="model")
    raise PackError(f"{len(bad)} weight tensors do not fit {dtype} (values beyond its range, first: "
                    f"{bad[0].removeprefix('model.diffusion_model.')}); nothing was written",
                    "save as bf16 or fp32", node="SaveStudentUNet", input_name="dtype")


def write_unet(model, folder: str, name_for, dtype: str, title: str, *, start: int = 0,
               extra_metadata: dict[str, str] | None = None) -> str:
    """Write a MODEL's UNet as ``folder/name_for(n)`` (the first free ``n >= start``, never over a file) in the
    ldm layout of ComfyUI's ModelSave, with the pack's metadata (+ ``extra_metadata``). Returns the path."""
    meta, extra = save_metadata(model, title)
    meta.update(extra_metadata or {})
    weights = unet_weights(model)
    sd = {f"model.diffusion_model.{k}": v.to(SAVE_DTYPES[dtype]).contiguous() for k, v in weights.items()}
    refuse_non_finite(sd, weights, dtype)
    sd.update(extra)
    return save_new(sd, folder, name_for, meta, start=start)
