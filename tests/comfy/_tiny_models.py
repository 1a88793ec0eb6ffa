"""Tiny random-weight UNets built the way the pack builds every UNet (host tests and benches import this).

The structures come from ``models/structure/structures.py`` (the one structure table); they are scaled to a
tiny width and built through the loader's own path (``nodes.host.unet.comfy_model``: ComfyUI's
``SD15/SD20/SDXL(unet_config)`` -> ``BaseModel`` / ``model_base.SDXL``, no fixed-list matching) and
wrapped in a ``ModelPatcher``. Weights are drawn from a seeded generator (ComfyUI's ops leave them
uninitialised). Only call after ComfyUI is importable (tests under tests/comfy/ get that from
tests/conftest.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.topology import SDXL_ADM, Topology

SD15_TOPOLOGY = S.SD1
TINY_SD_TOPOLOGY = S.BK_TINY
#: a cheap two-level SD15-family UNet for the many-sampler tests (no public model has this structure)
MINI_TOPOLOGY = Topology("sd1", 320, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), -2, 768, False)
SDXL_MINI_TOPOLOGY = Topology("sdxl", 320, (1, 2), (1, 1), (0, 1), (0, 0, 1, 1), -2, 2048, True, SDXL_ADM)

FAMILIES = {"sd15": ("sd1", 768, False), "sd20": ("sd2", 1024, True), "sdxl": ("sdxl", 2048, True)}


def tiny(topology: Topology, family: str = "sd15", *, model_channels: int = 32, context_dim: int | None = None,
         in_channels: int = 4) -> Topology:
    """``topology`` in ``family`` (sd15, sd20, sdxl) at a tiny width (SD2/SDXL: at least 64, their heads are
    64 wide)."""
    fam, ctx, linear = FAMILIES[family.lower()]
    return replace(topology, family=fam, model_channels=model_channels if fam == "sd1" else max(model_channels, 64),
                   context_dim=context_dim or ctx, use_linear=linear,
                   adm_in_channels=SDXL_ADM if fam == "sdxl" else None, in_channels=in_channels)


def clip_vision(folder, seed: int = 3):
    """A tiny random CLIP vision tower (ComfyUI's ClipVisionModel: 2 layers of width 64, projection 32, 32 px
    images), its config written into ``folder``: the numerics of the CLIP metrics without a full-size tower."""
    import json
    from pathlib import Path

    import comfy.clip_vision

    cfg = Path(folder) / "cv.json"
    cfg.write_text(json.dumps(
        {"hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 32, "intermediate_size": 128,
         "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
         "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 32}))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    init_weights(cv.model, seed)
    return cv


def init_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build(family: str = "sd15", topology: Topology | None = None, *, model_channels: int = 32, seed: int = 0,
          prediction: str = "eps", context_dim: int | None = None, in_channels: int = 4):
    """A ModelPatcher around a random tiny UNet of ``topology`` in ``family`` (sd15, sd20, sdxl)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from distilled_unets.nodes.host.unet import comfy_model

    default = SDXL_MINI_TOPOLOGY if family.lower() == "sdxl" else MINI_TOPOLOGY
    t = tiny(topology or default, family, model_channels=model_channels, context_dim=context_dim,
             in_channels=in_channels)
    model = comfy_model(t, torch.float32, None, prediction)
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning(family: str = "sd15", *, seed: int = 1, tokens: int = 8, batch: int = 1):
    """(positive, negative) conditioning lists as CLIPTextEncode would give them."""
    g = torch.Generator().manual_seed(seed)
    width = {"sd15": 768, "sd20": 1024, "sdxl": 2048}[family]
    out = []
    for _ in range(2):
        extra = {}
        if family == "sdxl":
            extra = {"pooled_output": torch.randn(batch, 1280, generator=g), "width": 64, "height": 64,
                     "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
        out.append([[torch.randn(batch, tokens, width, generator=g), extra]])
    return out[0], out[1]


def latent(size: int = 8, *, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 4, size, size)
