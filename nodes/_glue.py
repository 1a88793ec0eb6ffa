"""The code that must touch comfy.*: building ComfyUI's own UNet from a detected structure.

Decision 1 of DESIGN.md: the model that samples is ComfyUI's ``UNetModel``, built from the
``unet_config`` our detection derives, through ``supported_models.SD15 / SD20 / SDXL`` (never the
fixed-list matching), and wrapped in a ``ModelPatcher`` so memory management, attention backends,
dtypes, LoRA patching and lowvram behave as for any ComfyUI model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import torch

from ..models import registry
from ..models.detect import Detection, detect, from_diffusers_config
from ..models.errors import IncompleteModelError, NotAUNetError, PackError, WeightFileError
from ..models.weights import Source, resolve_unet_source, source_shapes

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


def _prediction_hint(src: Source, meta: dict) -> tuple[str | None, str]:
    """(prediction, where it came from) from a scheduler config, file metadata or the file name."""
    if src.folder:
        sched = os.path.join(os.path.dirname(os.path.abspath(src.folder)), "scheduler", "scheduler_config.json")
        if os.path.isfile(sched):
            try:
                with open(sched, encoding="utf-8") as f:
                    p = json.load(f).get("prediction_type")
                if p:
                    return ("v_prediction" if p.startswith("v") else "eps"), "scheduler_config.json"
            except (OSError, json.JSONDecodeError):
                pass
    p = str(meta.get("modelspec.prediction_type", "")).lower()
    if p:
        return ("v_prediction" if p.startswith("v") else "eps"), "file metadata"
    name = os.path.basename(os.path.normpath(src.name)).lower()
    if any(t in name for t in ("v-pred", "vpred", "v_pred", "768-v")):
        return "v_prediction", "file name"
    return None, ""


def read_unet(path: str) -> tuple[Source, Detection, dict]:
    """Check and detect the UNet at ``path`` (file or folder) without building anything."""
    src = resolve_unet_source(path)
    shapes, meta = source_shapes(src)
    det = detect(shapes)
    if src.config is not None and "block_out_channels" in src.config:
        try:
            cfg_topo = from_diffusers_config(src.config)
        except (KeyError, TypeError, ValueError, PackError):
            cfg_topo = None
        if cfg_topo is not None and cfg_topo.signature() != det.topology.signature():
            log.warning("config.json of %s describes %s, but the weights are %s; using the weights",
                        src.name, cfg_topo.describe(), det.topology.describe())
    return src, det, meta


def _load_tensors(src: Source) -> dict:
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


def comfy_model(topology, unet_dtype, manual_cast=None, prediction: str = "eps", device=None,
                fp8: bool = False):
    """ComfyUI's own model (``BaseModel`` / ``SDXL`` around its ``UNetModel``) for ``topology``, without
    weights: built through ComfyUI's ``SD15`` / ``SD20`` / ``SDXL`` model configs, no fixed-list matching."""
    unet_config = topology.comfy_unet_config()
    model_config = FAMILY_CLASSES[topology.family](unet_config)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    if fp8:
        model_config.optimizations["fp8"] = True
    model_type = (comfy.model_base.ModelType.V_PREDICTION if prediction == "v_prediction"
                  else comfy.model_base.ModelType.EPS)
    cls = comfy.model_base.SDXL if topology.family == "sdxl" else comfy.model_base.BaseModel
    model = cls(model_config, model_type=model_type, device=device)
    if unet_config.get("in_channels", 4) > 4:
        model.set_inpaint()
    return model


def build_model(det: Detection, sd: dict, weight_dtype: str = "default", prediction: str = "eps"):
    """ComfyUI's own UNet for ``det``, with the weights of ``sd`` (file keys), in a ModelPatcher."""
    n = len(det.prefix)
    new_sd = {det.key_map[k[n:]]: v for k, v in sd.items() if k.startswith(det.prefix) and k[n:] in det.key_map}
    opts = _dtype_options(weight_dtype)
    load_device = mm.get_torch_device()
    supported = list(FAMILY_CLASSES[det.topology.family].supported_inference_dtypes)
    unet_dtype = opts.get("dtype") or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(new_sd),
                                                    supported_dtypes=supported,
                                                    weight_dtype=comfy.utils.weight_dtype(new_sd))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, supported)
    model = comfy_model(det.topology, unet_dtype, manual_cast, prediction, fp8=bool(opts.get("fp8_optimizations")))
    _check_state_dict(model.diffusion_model, new_sd)
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(new_sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _check_state_dict(module: torch.nn.Module, sd: dict):
    """Refuse, before loading anything, weights that do not fill the built UNet exactly."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in want if k not in sd)
    unexpected = sorted(k for k in sd if k not in want)
    wrong = sorted(k for k in want if k in sd and tuple(sd[k].shape) != want[k])
    if missing:
        raise IncompleteModelError(f"{len(missing)} UNet tensors are missing for the detected structure "
                                   f"(e.g. {', '.join(missing[:3])})",
                                   "the file is incomplete or damaged; download it again")
    if unexpected or wrong:
        ex = (unexpected + wrong)[:3]
        raise NotAUNetError(f"{len(unexpected)} unexpected and {len(wrong)} wrongly shaped tensors for the detected "
                            f"structure (e.g. {', '.join(ex)})",
                            "this is not a UNet this pack can build; report the model with its file name")


def load_distilled_unet(path: str, weight_dtype: str = "default", prediction: str = "auto"):
    """(ModelPatcher, info text, description dict) for the UNet at ``path``."""
    src, det, meta = read_unet(path)
    pred, why = (prediction, "chosen") if prediction != "auto" else _prediction_hint(src, meta)
    sd = _load_tensors(src)
    if pred is None:
        pred, why = "eps", "default (all released students are epsilon models)"
        if det.topology.family == "sd2":
            conv = {det.key_map.get(k[len(det.prefix):], k): v for k, v in sd.items()}
            if "output_blocks.11.1.transformer_blocks.0.norm1.bias" in conv:
                mt = comfy.supported_models.SD20(det.topology.comfy_unet_config()).model_type(conv, "")
                if mt == comfy.model_base.ModelType.V_PREDICTION:
                    pred, why = "v_prediction", "ComfyUI's SD2 heuristic (full-depth SD2 UNet)"
    patcher = build_model(det, sd, weight_dtype, pred)
    params = sum(v.numel() for k, v in sd.items() if k.startswith(det.prefix))
    hint = " ".join([os.path.normpath(path), str(meta.get("modelspec.title", ""))])
    d = registry.describe(det.topology, hint, params)
    text = registry.info_text(d, det.layout, f"{pred} ({why})")
    log.info("Distilled UNet %s: %s", os.path.basename(os.path.normpath(path)), text.splitlines()[0])
    return patcher, text, d
