"""Tiny random-weight UNets built through ComfyUI's own classes (host tests and benches import this).

``comfy.supported_models.SD15/SD20/SDXL(unet_config)`` → ``BaseModel`` / ``model_base.SDXL`` →
``ModelPatcher``; no fixed-list matching, so scaled-down widths work. Weights are drawn from a
seeded generator (ComfyUI's ops leave them uninitialised). Only call after ComfyUI is importable
(tests under tests/comfy/ get that from tests/conftest.py).
"""

from __future__ import annotations

import torch

# ldm-layout topologies (lists run from the shallowest level; the output list is one entry per output
# block, shallowest level first) (DESIGN: detection gives these for the real files), widths scaled by `ch`.
SD15_TOPOLOGY = dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     transformer_depth_middle=1)
TINY_SD_TOPOLOGY = dict(channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1], transformer_depth=[1, 1, 1],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1], transformer_depth_middle=-2)
# a cheap SD15-family UNet for the many-sampler tests
MINI_TOPOLOGY = dict(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                     transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=-2)
SDXL_MINI_TOPOLOGY = dict(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[0, 1],
                          transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=-2)


def unet_config(topology: dict, *, model_channels: int = 32, context_dim: int = 768, linear: bool = False,
                adm_in_channels: int | None = None, in_channels: int = 4) -> dict:
    cfg = dict(topology)
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    cfg.update(use_checkpoint=False, image_size=32, in_channels=in_channels, out_channels=4,
               model_channels=model_channels, use_spatial_transformer=True, legacy=False,
               context_dim=context_dim, use_linear_in_transformer=linear, use_temporal_attention=False,
               use_temporal_resblock=False)
    if adm_in_channels is not None:
        cfg.update(adm_in_channels=adm_in_channels, num_classes="sequential")
    else:
        cfg.update(adm_in_channels=None)
    return cfg


def _init_weights(module: torch.nn.Module, seed: int) -> None:
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


def build(family: str = "sd15", topology: dict | None = None, *, model_channels: int = 32, seed: int = 0,
          prediction: str = "eps", context_dim: int | None = None, in_channels: int = 4):
    """A ModelPatcher around a random tiny UNet of ``family`` (sd15, sd20, sdxl)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    family = family.lower()
    if family == "sd15":
        cfg = unet_config(topology or MINI_TOPOLOGY, model_channels=model_channels,
                          context_dim=context_dim or 768, in_channels=in_channels)
        model_config = sm.SD15(cfg)
        model_cls = comfy.model_base.BaseModel
    elif family == "sd20":
        cfg = unet_config(topology or MINI_TOPOLOGY, model_channels=max(model_channels, 64),
                          context_dim=context_dim or 1024, linear=True, in_channels=in_channels)
        model_config = sm.SD20(cfg)
        model_cls = comfy.model_base.BaseModel
    elif family == "sdxl":
        cfg = unet_config(topology or SDXL_MINI_TOPOLOGY, model_channels=max(model_channels, 64),
                          context_dim=context_dim or 2048, linear=True, adm_in_channels=2816,
                          in_channels=in_channels)
        model_config = sm.SDXL(cfg)
        model_cls = comfy.model_base.SDXL
    else:
        raise ValueError(family)
    model_config.set_inference_dtype(torch.float32, None)
    mtype = {"eps": comfy.model_base.ModelType.EPS,
             "v_prediction": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    model = model_cls(model_config, model_type=mtype, device=None)
    _init_weights(model.diffusion_model, seed)
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
