"""LoRA on distilled UNets: our key map (``models/patches/lora_keys.py``) + ComfyUI's own LoRA patching.

The key work is host-free; this module reads the file (safetensors only), asks the plan for each
UNet the MODEL runs (a multi-UNet MODEL carries its early UNets as additional models), then goes
through ``comfy.lora.load_lora`` and ``add_patches`` on clones, exactly like ``LoraLoader``, so
stacking, lowvram and unpatching behave the same.
"""

from __future__ import annotations

import logging
import os

import comfy.lora
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.errors import LoraError
from ..models.patches.lora_keys import (
    LoraPlan,
    adapter_problem,
    family_mismatch,
    is_text_encoder,
    plan_lora,
    split_key,
)
from ..models.patches.multi_unet import stage_patchers
from .host.unet import block_map_of_model, topology_of

log = logging.getLogger("distilled_unets")

NODE_ID = "DistilledLoraLoader"
_CACHE: dict[str, tuple] = {}


def read_lora_file(path: str, *, node: str = NODE_ID, input_name: str = "lora_name") -> tuple[dict, dict]:
    """(tensors, metadata) of a LoRA file, read with safetensors only (no pickle)."""
    if not path.lower().endswith(".safetensors"):
        raise LoraError(f"'{os.path.basename(path)}' is not a .safetensors file; pickled LoRAs are not "
                        "loaded (they can run code)", "convert it to .safetensors, or use the .safetensors "
                        "release of the LoRA", path=path, node=node, input_name=input_name)
    try:
        st = os.stat(path)
    except OSError as e:
        raise LoraError(f"cannot read the LoRA file ({e.strerror})", "pick a file that exists under "
                        "models/loras", path=path, node=node, input_name=input_name) from e
    token = (st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(path)
    if hit and hit[0] == token:
        return hit[1], hit[2]
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise LoraError(f"the LoRA file is corrupt or truncated ({type(e).__name__}: {e})",
                        "download the file again (compare its size with the source)", path=path,
                        node=node, input_name=input_name) from e
    _CACHE.clear()
    _CACHE[path] = (token, tensors, metadata)
    return tensors, metadata


def _unet_shapes(patcher) -> dict:
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


def plan_for(patcher, tensors: dict, metadata: dict, *, apply_uncertain: bool, node: str = NODE_ID,
             adapter_config: dict | None = None) -> LoraPlan:
    topology = topology_of(patcher)
    bad = family_mismatch(tensors, topology)
    if bad:
        raise LoraError(bad, "use a LoRA made for this model family (an SDXL LoRA needs an SDXL-family "
                        "UNet such as SSD-1B, Vega or KOALA; an SD1.5 LoRA needs BK-SDM/segmind v1)",
                        node=node, input_name="lora_name")
    try:
        return plan_lora(tensors, topology, _unet_shapes(patcher), block_map=block_map_of_model(patcher),
                         metadata=metadata, adapter_config=adapter_config, apply_uncertain=apply_uncertain)
    except LoraError as e:
        e.node, e.input_name = e.node or node, e.input_name or "lora_name"
        raise


def apply_lora(model, clip, tensors: dict, metadata: dict, strength_model: float, strength_clip: float, *,
               apply_uncertain: bool = False, node: str = NODE_ID, adapter_config: dict | None = None):
    """(MODEL clone, CLIP clone, report). Everything is planned before anything is patched; the inputs
    are never modified."""
    plans: list[tuple[str, object, LoraPlan, dict]] = []
    if model is not None:
        for label, p in stage_patchers(model):
            plan = plan_for(p, tensors, metadata, apply_uncertain=apply_uncertain, node=node,
                            adapter_config=adapter_config)
            lora = tensors
            if plan.extra_alpha:
                lora = dict(tensors)
                for prefix, a in plan.extra_alpha.items():
                    lora[prefix + ".alpha"] = torch.tensor(a)
            loaded = comfy.lora.load_lora(lora, plan.to_load, log_missing=False)
            plans.append((label, p, plan, loaded))
    clip_loaded = {}
    te_prefixes = plans[0][2].text_encoder if plans else []
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        # text-encoder modules whose tensors ComfyUI could not apply stay out (the plan lists them as damaged)
        damaged = {sp[0] for k in tensors if (sp := split_key(k)) and is_text_encoder(sp[0])
                   and adapter_problem(sp[0], tensors)}
        usable = {k: v for k, v in tensors.items() if not ((sp := split_key(k)) and sp[0] in damaged)}
        clip_loaded = comfy.lora.load_lora(usable, clip_map, log_missing=False)

    unet_total = sum(len(pl.to_load) for _, _, pl, _ in plans)
    if model is not None and not any(pl.unet_modules for _, _, pl, _ in plans) and not clip_loaded:
        raise LoraError("the LoRA has no UNet keys this pack can read"
                        + (" (it holds text-encoder keys only; connect a CLIP)" if te_prefixes else ""),
                        "check that the file is a Stable Diffusion LoRA; for a text-encoder-only LoRA "
                        "connect the CLIP input", node=node, input_name="lora_name")
    if model is not None and unet_total == 0 and not clip_loaded:
        raise LoraError("nothing in this LoRA fits this model:\n" + plans[0][2].summary(),
                        "use a LoRA trained for this UNet or its teacher", node=node, input_name="lora_name")

    lines = []
    new_model = None
    if model is not None:
        new_model = model.clone()
        by_label = dict(stage_patchers(new_model))  # clones of every stage, owned by new_model
        for label, _, plan, loaded in plans:
            target = by_label[label]
            accepted = set(target.add_patches(loaded, strength_model))
            missing = [k for k in plan.to_load.values() if k not in accepted]
            head = f"[{label}] " if len(plans) > 1 else ""
            lines.append(head + plan.summary())
            if missing:
                lines.append(f"{head}not accepted by the model patcher: {len(missing)}; e.g. {missing[:3]}")
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        k1 = set(new_clip.add_patches(clip_loaded, strength_clip))
        lines.append(f"CLIP: applied {len(k1)} of {len(te_prefixes)} text-encoder modules")
    elif te_prefixes:
        lines.append(f"CLIP: not connected, {len(te_prefixes)} text-encoder modules not applied")
    report = "\n".join(lines)
    log.info("DistilledLoraLoader: %s", report.replace("\n", " | "))
    return new_model, new_clip, report


class DistilledLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="Distilled LoRA Loader",
            category="distilled_unets/lora",
            description="Applies a LoRA (kohya, diffusers, PEFT, ldm, LyCORIS LoHa/LoKr) to a distilled "
                        "UNet. "
                        "A LoRA trained on the teacher (SD1.5/SD2/SDXL) is mapped block by block onto the "
                        "student; modules of removed blocks are dropped and counted, never put on another "
                        "block. Works on multi-UNet MODELs (each UNet gets its own mapping).",
            inputs=[
                io.Model.Input("model", tooltip="The UNet (or multi-UNet MODEL) to patch; it is cloned, "
                               "not modified."),
                io.Clip.Input("clip", optional=True, tooltip="Optional: the text encoder, for the LoRA's "
                              "text-encoder part."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="LoRA file from models/loras (.safetensors only)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Strength on the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Strength on the text encoder (ignored without CLIP)."),
                io.Combo.Input("uncertain_blocks", options=["skip", "apply"], default="skip",
                               tooltip="Teacher LoRA on a student whose kept teacher layers are not "
                                       "published (SDXL students with fewer transformer blocks or "
                                       "pairs): 'skip' leaves those blocks alone, 'apply' patches them "
                                       "by position."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None,
                uncertain_blocks="skip") -> io.NodeOutput:
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip, "strengths are 0: nothing applied",
                                 ui=ui.PreviewText("strengths are 0: nothing applied"))
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors, metadata = read_lora_file(path)
        try:
            new_model, new_clip, report = apply_lora(model, clip, tensors, metadata, strength_model,
                                                     strength_clip, apply_uncertain=uncertain_blocks == "apply")
        except LoraError as e:  # every error about a file names it
            e.path = e.path or path
            raise
        return io.NodeOutput(new_model, new_clip if clip is not None else None, report,
                             ui=ui.PreviewText(report))


NODES = [DistilledLoraLoader]
