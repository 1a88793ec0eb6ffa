"""The code that must touch comfy.*: building ComfyUI's own UNet from a detected structure.

The pack's first rule: the model that samples is ComfyUI's ``UNetModel``, built from the
``unet_config`` our detection derives, through ``supported_models.SD15 / SD20 / SDXL`` (never the
fixed-list matching), and wrapped in a ``ModelPatcher`` so memory management, attention backends,
dtypes, LoRA patching and lowvram behave as for any ComfyUI model.
"""

from __future__ import annotations

import contextlib
import logging

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import torch

from ...models.errors import PackError, WeightFileError
from ...models.files.loader import (
    block_map_of,
    check_state_dict,
    info,
    ldm_state_dict,
    prediction_hint,
    read_unet,
    recipe_of,
)
from ...models.structure import registry
from ...models.structure.blockmap import BlockMap
from ...models.structure.topology import Topology, from_comfy_config
from .condconv import condconv_paths, swap_condconv
from .patcher import expected_shapes, load_weights, new_patcher, set_reload

log = logging.getLogger("distilled_unets")

FAMILY_CLASSES = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                  "sdxl": comfy.supported_models.SDXL}
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "fp16", "bf16", "fp32"]
PREDICTIONS = ["auto", "eps", "v_prediction"]


@contextlib.contextmanager
def node_errors(node: str, input_name: str):
    """Stamp the node and input on any PackError raised inside, so ComfyUI's message names them."""
    try:
        yield
    except PackError as e:
        e.node = e.node or node
        e.input_name = e.input_name or input_name
        raise


def _dtype_options(weight_dtype: str) -> dict:
    return {
        "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
        "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
        "fp8_e5m2": {"dtype": torch.float8_e5m2},
        "fp16": {"dtype": torch.float16},
        "bf16": {"dtype": torch.bfloat16},
        "fp32": {"dtype": torch.float32},
    }.get(weight_dtype, {})


#: ModelPatcher attachments the pack sets on the UNets it builds (copied by ``clone``)
BLOCK_MAP_KEY = "distilled_unets.block_map"
RECIPE_KEY = "distilled_unets.recipe"
#: the recommended settings of the published model of a MODEL's structure ({"model", "sampler", "scheduler", "steps",
#: "cfg", "width", "height"}; the loader picks among identical structures by the file name): Evaluate Student and
#: tools/evaluate.py sample with them where left to the student
RECOMMENDED_KEY = "distilled_unets.recommended"


def _load_tensors(src) -> dict:
    sd = {}
    for f in src.files:
        try:
            sd.update(comfy.utils.load_torch_file(f, safe_load=True))
        except PackError:
            raise
        except Exception as e:  # the header was checked; this is corruption inside the data
            raise WeightFileError(f"reading the tensors failed ({type(e).__name__}: {str(e)[:160]})",
                                  "download the file again", path=f) from e
    return sd


def comfy_model(topology: Topology, unet_dtype, manual_cast=None, prediction: str = "eps", device=None,
                fp8: bool = False, zsnr: bool = False):
    """ComfyUI's own model (``BaseModel`` / ``SDXL`` around its ``UNetModel``) for ``topology``, without
    weights: built through ComfyUI's ``SD15`` / ``SD20`` / ``SDXL`` model configs, no fixed-list matching."""
    unet_config = topology.comfy_unet_config()
    model_config = FAMILY_CLASSES[topology.family](unet_config)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    if fp8:
        model_config.optimizations["fp8"] = True
    if zsnr:
        model_config.sampling_settings = dict(model_config.sampling_settings, zsnr=True)
    model_type = (comfy.model_base.ModelType.V_PREDICTION if prediction == "v_prediction"
                  else comfy.model_base.ModelType.EPS)
    cls = comfy.model_base.SDXL if topology.family == "sdxl" else comfy.model_base.BaseModel
    model = cls(model_config, model_type=model_type, device=device)
    if unet_config.get("in_channels", 4) > 4:
        model.set_inpaint()
    return model


def build_model(topology: Topology, new_sd: dict, weight_dtype: str = "default", prediction: str = "eps", *,
                zsnr: bool = False, path: str | None = None, disable_dynamic: bool = False):
    """ComfyUI's own UNet for ``topology`` with the weights of ``new_sd`` (ldm names), in the patcher ComfyUI's
    own loaders use (``disable_dynamic``: the plain one even where dynamic VRAM is on)."""
    opts = _dtype_options(weight_dtype)
    load_device = mm.get_torch_device()
    supported = list(FAMILY_CLASSES[topology.family].supported_inference_dtypes)
    unet_dtype = opts.get("dtype") or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(new_sd),
                                                    supported_dtypes=supported,
                                                    weight_dtype=comfy.utils.weight_dtype(new_sd))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, supported)
    model = comfy_model(topology, unet_dtype, manual_cast, prediction, fp8=bool(opts.get("fp8_optimizations")),
                        zsnr=zsnr)
    condconv = condconv_paths(new_sd)
    if condconv:  # A-SDM's CondConv layers: ComfyUI's UNet with exactly those convolutions swapped
        swap_condconv(model.diffusion_model, condconv)
    # expected_shapes: dynamic VRAM builds some layers without weights until they are loaded
    check_state_dict(expected_shapes(model.diffusion_model), {k: v.shape for k, v in new_sd.items()}, path)
    patcher = new_patcher(model, load_device, mm.unet_offload_device(), disable_dynamic=disable_dynamic)
    load_weights(model, new_sd, patcher)  # assign=True for a dynamic-VRAM patcher, as comfy.sd does
    return patcher


def recommended_settings(entry) -> dict | None:
    """The :data:`RECOMMENDED_KEY` attachment of a registry entry (None when it has no recommended settings)."""
    if entry is None or entry.rec is None:
        return None
    r = entry.rec
    return {"model": entry.id, "sampler": r.sampler, "scheduler": r.scheduler, "steps": r.steps, "cfg": r.cfg,
            "width": r.resolution[0], "height": r.resolution[1]}


def model_from_state_dict(topology: Topology, sd: dict, *, prediction: str = "eps", weight_dtype: str = "default",
                          zsnr: bool = False, attachments: dict | None = None):
    """A MODEL of ``topology`` from ldm-named tensors, built exactly as the loader builds a file (the student
    builder and the distiller hand their results over through this); it carries the recommended settings of the
    published model of its structure, if any (as the loader's MODEL does)."""
    patcher = build_model(topology, sd, weight_dtype, prediction, zsnr=zsnr)
    attachments = dict(attachments or {})
    rec = recommended_settings(registry.identify(topology)[0])
    if rec is not None:
        attachments.setdefault(RECOMMENDED_KEY, rec)
    for k, v in attachments.items():
        patcher.set_attachments(k, v)
    return patcher


def unet_weights(patcher) -> dict:
    """The UNet weights a MODEL samples with (LoRA and other weight patches merged), as CPU tensors under
    ldm names, to be read at once (they may be the model's own tensors). The MODEL is not changed: an
    unpatched model is read directly; a patched one is loaded the way ComfyUI's own ModelSave loads it,
    and read through its saving path."""
    prefix = "diffusion_model."
    patched = bool(patcher.patches) or bool(getattr(patcher, "weight_wrapper_patches", None))
    if not patched:
        sd = patcher.model.diffusion_model.state_dict()
    elif hasattr(patcher, "model_state_dict_for_saving"):  # ComfyUI >= 0.4: lazily patched, per tensor
        mm.load_models_gpu([patcher])
        sd = patcher.model_state_dict_for_saving(patcher.model.diffusion_model, prefix)
    else:  # ComfyUI 0.3.x: ModelSave patches the weights in place while loaded
        mm.load_models_gpu([patcher], force_patch_weights=True)
        sd = patcher.model.diffusion_model.state_dict()
    # no copy of CPU tensors: callers copy what they keep (a full SDXL teacher is 10 GB in fp32)
    return {k: v.detach().to("cpu") for k, v in sd.items()}


def unet_from_state_dict(topology: Topology, sd: dict, dtype=torch.float32):
    """A bare ``UNetModel`` of ``topology`` holding ``sd`` (CondConv layers included), on the CPU, outside any
    ModelPatcher (for training copies)."""
    model = comfy_model(topology, dtype, None)
    condconv = condconv_paths(sd)
    if condconv:
        swap_condconv(model.diffusion_model, condconv)
    model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.diffusion_model


def topology_of(patcher) -> Topology:
    """The structure of a MODEL's UNet, from the config ComfyUI built it with."""
    return from_comfy_config(patcher.model.model_config.unet_config)


def block_map_of_model(patcher) -> BlockMap | None:
    """The block map a student built or loaded by this pack carries (None for other models)."""
    return patcher.get_attachment(BLOCK_MAP_KEY) if hasattr(patcher, "get_attachment") else None


def prediction_of(patcher) -> str:
    """'v_prediction' or 'eps' for a MODEL (other prediction types are refused by the callers)."""
    return "v_prediction" if patcher.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "eps"


def load_distilled_unet(path: str, weight_dtype: str = "default", prediction: str = "auto", *,
                        disable_dynamic: bool = False):
    """(ModelPatcher, info text) for the UNet at ``path``."""
    f = read_unet(path)
    pred, zsnr, why = (prediction, False, "chosen") if prediction != "auto" else prediction_hint(f)
    sd = ldm_state_dict(f, _load_tensors(f.source))
    if pred is None:
        pred, why = "eps", "default (all released students are epsilon models)"
        if f.topology.family == "sd2" and "output_blocks.11.1.transformer_blocks.0.norm1.bias" in sd:
            mt = comfy.supported_models.SD20(f.topology.comfy_unet_config()).model_type(sd, "")
            if mt == comfy.model_base.ModelType.V_PREDICTION:
                pred, why = "v_prediction", "ComfyUI's SD2 heuristic (full-depth SD2 UNet)"
    try:
        patcher = build_model(f.topology, sd, weight_dtype, pred, zsnr=zsnr, path=f.source.name,
                              disable_dynamic=disable_dynamic)
    except PackError as e:
        e.path = e.path or f.source.name
        raise
    # how to load it again (ComfyUI's multi-GPU clones and non-dynamic delegates ask for it)
    set_reload(patcher, _reload_unet, (path, weight_dtype, prediction))
    bm = block_map_of(f.metadata, f.topology)
    if bm is not None:
        patcher.set_attachments(BLOCK_MAP_KEY, bm)
    recipe = recipe_of(f.metadata)
    if recipe is not None:
        patcher.set_attachments(RECIPE_KEY, recipe)
    text, described = info(f, pred + (" (zero terminal SNR)" if zsnr else ""), why)
    rec = recommended_settings(described["entry"])
    if rec is not None:
        patcher.set_attachments(RECOMMENDED_KEY, rec)
    log.info("Distilled UNet %s: %s", f.name, text.splitlines()[0])
    return patcher, text


def _reload_unet(path: str, weight_dtype: str, prediction: str, disable_dynamic: bool = False):
    return load_distilled_unet(path, weight_dtype, prediction, disable_dynamic=disable_dynamic)[0]
