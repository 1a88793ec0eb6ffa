"""The model patcher ComfyUI itself would build, and weight loading as ComfyUI's own loaders do it.

Newer ComfyUI (0.33) builds ``comfy.model_patcher.CoreModelPatcher``: ``ModelPatcher`` by default, rebound
by ``main.py`` to ``ModelPatcherDynamic`` when dynamic VRAM works (NVIDIA, recent ROCm; it reroutes to a
plain ``ModelPatcher`` for a CPU load device). A dynamic patcher streams weights from RAM on demand, so
``comfy/sd.py`` loads them with ``load_model_weights(sd, prefix, assign=patcher.is_dynamic())`` (the
module takes the state-dict tensors instead of copying them into fresh ones). ComfyUI 0.3.64 has neither:
``ModelPatcher`` and a ``load_model_weights`` without ``assign``. Everything here detects the feature, never
the version, and reads ``CoreModelPatcher`` at call time (``main.py`` rebinds it after imports).
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import comfy.model_management as mm
import comfy.model_patcher

log = logging.getLogger("distilled_unets")


def patcher_class(disable_dynamic: bool = False) -> type:
    """``CoreModelPatcher`` where the host has one (unless ``disable_dynamic``), else ``ModelPatcher``."""
    legacy = comfy.model_patcher.ModelPatcher
    if disable_dynamic:
        return legacy
    return getattr(comfy.model_patcher, "CoreModelPatcher", legacy)


def new_patcher(model, load_device, offload_device, *, disable_dynamic: bool = False):
    """A patcher around ``model`` (a ComfyUI ``BaseModel``) of the class ComfyUI's own loaders use now."""
    return patcher_class(disable_dynamic)(model, load_device=load_device, offload_device=offload_device)


def is_dynamic(patcher) -> bool:
    """True for a dynamic-VRAM patcher (``ModelPatcherDynamic``); False on hosts without the notion."""
    fn = getattr(patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def _takes_assign(load_model_weights: Callable) -> bool:
    try:
        return "assign" in inspect.signature(load_model_weights).parameters
    except (TypeError, ValueError):  # a builtin or C-level callable: do not guess
        return False


def load_weights(model, sd: dict, patcher) -> None:
    """Load ``sd`` (ComfyUI's ldm key names, no prefix) into ``model`` the way ``comfy.sd`` does for
    ``patcher``: the model moves to the patcher's offload device first unless that is the CPU (where it
    already is), then ``load_model_weights`` with ``assign=True`` when the patcher is dynamic and the
    host's ``load_model_weights`` takes ``assign``; otherwise the tensors are copied in, as always."""
    offload = getattr(patcher, "offload_device", None)
    if offload is not None and not mm.is_device_cpu(offload):
        model.to(offload)
    if is_dynamic(patcher) and _takes_assign(model.load_model_weights):
        model.load_model_weights(sd, "", assign=True)
    else:
        model.load_model_weights(sd, "")


def set_reload(patcher, factory: Callable, args: tuple, index: int | None = None) -> None:
    """Register how to load this model again from its file, where the host asks for it
    (``cached_patcher_init``: multi-GPU deep clones, and the non-dynamic delegate a dynamic patcher makes
    for hooked conditioning). ``factory(*args)`` (its ``[index]`` when given) must return a new patcher
    and accept ``disable_dynamic=True``. A no-op on hosts without the attribute."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (factory, tuple(args)) if index is None else (factory, tuple(args), index)


def expected_shapes(module) -> dict[str, tuple]:
    """``{name: shape}`` of every tensor ``module`` takes from a state dict, including the weights of the
    layers ComfyUI builds lazily while dynamic VRAM is on (``comfy.ops`` Linear / Embedding keep
    ``weight = None`` until loaded, so ``module.state_dict()`` alone misses them)."""
    out = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, m in module.named_modules():
        if getattr(m, "weight", 0) is not None:
            continue
        prefix = f"{name}." if name else ""
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            out[prefix + "weight"] = (m.out_features, m.in_features)
            if getattr(m, "bias", None) is None and getattr(m, "comfy_need_lazy_init_bias", False):
                out[prefix + "bias"] = (m.out_features,)
        elif hasattr(m, "num_embeddings") and hasattr(m, "embedding_dim"):
            out[prefix + "weight"] = (m.num_embeddings, m.embedding_dim)
    return out
