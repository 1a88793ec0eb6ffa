"""Test-side builders of the three on-disk layouts, written independently of the pack's converter.

* diffusers: what ``UNet2DConditionModel.state_dict()`` gives;
* ldm contiguous: ComfyUI's numbering (one ``input_blocks`` entry per resnet and per downsampler);
* ldm gapped: the numbering of diffusers' ``scripts/convert_diffusers_to_original_*.py``, which
  assumes the teacher's two resnets per down stage and three per up stage
  (``input_blocks.{3i+j+1}``, downsampler ``input_blocks.{3(i+1)}``, ``output_blocks.{3i+j}``,
  up-sampler ``output_blocks.{3i+2}.{1 if i == 0 else 2}``), leaving holes for a student.
"""

from __future__ import annotations

import copy
import re

import torch
from distilled_unets.models.structure.registry import REGISTRY
from distilled_unets.models.structure.topology import diffusers_config

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
BASIC = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}

def cases():
    """(id, registry entry, full-size diffusers config) for every reference topology, teachers included."""
    return [(e.id, e, diffusers_config(e.structure)) for e in REGISTRY]


def tiny_config(cfg: dict) -> dict:
    """The same topology at tiny widths: SD1 and SDXL 32/64/128, SD2 64/128/256 (SD2 has attention at
    level 0, and ComfyUI's SD2/SDXL heads are 64 wide, so an attention level needs 64 channels)."""
    cfg = copy.deepcopy(cfg)
    boc = cfg["block_out_channels"]
    div = 5 if cfg["cross_attention_dim"] == 1024 else 10
    cfg["block_out_channels"] = [c // div for c in boc]
    if cfg["cross_attention_dim"] != 768:
        cfg["attention_head_dim"] = [max(1, c // div // 64) for c in boc]
    cfg["sample_size"] = 8
    return cfg


def diffusers_model(cfg: dict, device="cpu", seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        m = UNet2DConditionModel(**cfg)
    if device != "meta":
        with torch.no_grad():  # diffusers zero-inits nothing important, but make every tensor matter
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _resnet_rest(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return RESNET[head] + "." + tail


def to_ldm(sd: dict, cfg: dict, gapped: bool) -> dict:
    """diffusers state dict -> ldm state dict (contiguous like ComfyUI, or gapped like the script)."""
    n = len(cfg["block_out_channels"])
    lpbs = cfg["layers_per_block"]
    lpbs = list(lpbs) if isinstance(lpbs, (list, tuple)) else [lpbs] * n
    out = {}
    # contiguous index tables
    in_idx, idx = {}, 1
    for i in range(n):
        for j in range(lpbs[i]):
            in_idx[(i, j)] = idx
            idx += 1
        if i < n - 1:
            in_idx[(i, "down")] = idx
            idx += 1
    out_idx, idx = {}, 0
    for i in range(n):
        for j in range(lpbs[n - 1 - i] + 1):
            out_idx[(i, j)] = idx
            idx += 1
    for k, v in sd.items():
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", k)
        if m:
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "downsamplers":
                b = 3 * (i + 1) if gapped else in_idx[(i, "down")]
                out[f"input_blocks.{b}.0.op.{rest[len('conv.'):]}"] = v
                continue
            b = 3 * i + j + 1 if gapped else in_idx[(i, j)]
            out[f"input_blocks.{b}." + ("0." + _resnet_rest(rest) if kind == "resnets" else "1." + rest)] = v
            continue
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "upsamplers":
                rest = rest[len("conv."):]
                if gapped:
                    out[f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.conv.{rest}"] = v
                else:
                    b = out_idx[(i, lpbs[n - 1 - i])]
                    has_attn = any(x.startswith(f"up_blocks.{i}.attentions.{lpbs[n - 1 - i]}.") for x in sd)
                    out[f"output_blocks.{b}.{2 if has_attn else 1}.conv.{rest}"] = v
                continue
            b = 3 * i + j if gapped else out_idx[(i, j)]
            out[f"output_blocks.{b}." + ("0." + _resnet_rest(rest) if kind == "resnets" else "1." + rest)] = v
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            b = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
            out[f"middle_block.{b}." + (_resnet_rest(rest) if kind == "resnets" else rest)] = v
            continue
        for a, b in BASIC.items():
            if k.startswith(a + "."):
                out[b + k[len(a):]] = v
                break
        else:
            raise KeyError(k)
    return out


def layouts(sd: dict, cfg: dict) -> dict:
    """{layout name: state dict} for the three layouts."""
    return {"diffusers": dict(sd), "ldm": to_ldm(sd, cfg, gapped=False), "ldm-gapped": to_ldm(sd, cfg, gapped=True)}


def meta_shapes(cfg: dict) -> dict:
    m = diffusers_model(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def write_training_dataset(folder, latents: list, conditioning: list, shard_size: int = 3) -> None:
    """A folder in ComfyUI 0.33's Save Training Dataset layout: ``shard_NNNN.pkl`` files (torch.save of
    ``{"latents": [{"samples": [1, C, H, W]}, ...], "conditioning": [CONDITIONING, ...]}``) and metadata.json,
    written as that node writes them (and for the ComfyUI versions that have no such node)."""
    import json
    import os

    os.makedirs(folder, exist_ok=True)
    n = len(latents)
    shards = (n + shard_size - 1) // shard_size
    for s in range(shards):
        with open(os.path.join(folder, f"shard_{s:04d}.pkl"), "wb") as f:
            torch.save({"latents": latents[s * shard_size:(s + 1) * shard_size],
                        "conditioning": conditioning[s * shard_size:(s + 1) * shard_size]}, f)
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump({"num_samples": n, "num_shards": shards, "shard_size": shard_size}, f)
