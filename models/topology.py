"""A structural description of an SD-style UNet, in the terms ComfyUI's ``UNetModel`` is built from.

Everything the loader detects ends up here; everything the nodes build comes from here. The
fields mirror ComfyUI's ldm ``unet_config`` (``comfy.model_detection.detect_unet_config``), with two
conventions made explicit:

* ``transformer_depth`` has one entry per *input* ResBlock, in input order;
* ``transformer_depth_output`` has one entry per *output* block in **ComfyUI's order**: the
  constructor pops from the end, so the LAST element belongs to ``output_blocks.0``.
  :meth:`Topology.output_depths` gives them in ``output_blocks`` order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("sd1", "sd2", "sdxl")
#: context width -> family (SD1: CLIP-L 768, SD2: OpenCLIP-H 1024, SDXL: CLIP-L + bigG 2048)
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
SDXL_ADM = 2816


@dataclass(frozen=True)
class Topology:
    family: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int  # >=0: res+attn+res, -1: one resnet, -2: no middle block
    context_dim: int
    use_linear: bool
    adm_in_channels: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    disable_self_attn: tuple[bool, ...] | None = None  # per level (SDXS-0.9: attn1 is cross-attn)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    # ---- derived views -------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def output_depths(self) -> list[int]:
        """Transformer depth per output block, in ``output_blocks`` order (index 0 = deepest)."""
        return list(reversed(self.transformer_depth_output))

    def input_depths_by_level(self) -> list[list[int]]:
        out, i = [], 0
        for n in self.num_res_blocks:
            out.append(list(self.transformer_depth[i:i + n]))
            i += n
        return out

    def output_depths_by_level(self) -> list[list[int]]:
        """Per output level (deepest first, as ``up_blocks``), the depth of each of its blocks."""
        depths = self.output_depths()
        out, i = [], 0
        for level in reversed(range(self.levels)):
            n = self.num_res_blocks[level] + 1
            out.append(depths[i:i + n])
            i += n
        return out

    @property
    def heads_config(self) -> dict:
        """Heads as ComfyUI's model classes set them: SD15 uses 8 heads, SD20/SDXL 64-wide heads."""
        if self.family == "sd1":
            return {"num_heads": 8, "num_head_channels": -1}
        return {"num_heads": -1, "num_head_channels": 64}

    # ---- ComfyUI config ------------------------------------------------------------------
    def comfy_unet_config(self) -> dict:
        """The ldm ``unet_config`` dict ComfyUI's ``supported_models`` classes take."""
        cfg = {
            "use_checkpoint": False,
            "image_size": 32,
            "out_channels": self.out_channels,
            "use_spatial_transformer": True,
            "legacy": False,
            "in_channels": self.in_channels,
            "model_channels": self.model_channels,
            "num_res_blocks": list(self.num_res_blocks),
            "transformer_depth": list(self.transformer_depth),
            "channel_mult": list(self.channel_mult),
            "transformer_depth_middle": self.transformer_depth_middle,
            "use_linear_in_transformer": self.use_linear,
            "context_dim": self.context_dim,
            "transformer_depth_output": list(self.transformer_depth_output),
            "use_temporal_resblock": False,
            "use_temporal_attention": False,
            "adm_in_channels": self.adm_in_channels,
            "num_classes": "sequential" if self.adm_in_channels else None,
        }
        if self.disable_self_attn and any(self.disable_self_attn):
            cfg["disable_self_attentions"] = list(self.disable_self_attn)
        return cfg

    def signature(self) -> tuple:
        """What identifies a structure (for the registry): everything but the weights' values."""
        return (self.family, self.model_channels, self.channel_mult, self.num_res_blocks,
                self.transformer_depth, self.transformer_depth_output, self.transformer_depth_middle,
                self.context_dim, self.use_linear, self.adm_in_channels, self.in_channels,
                tuple(self.disable_self_attn or ()) if self.disable_self_attn and any(self.disable_self_attn)
                else ())

    def describe(self) -> str:
        mid = {-1: "resnet-only mid", -2: "no mid"}.get(self.transformer_depth_middle,
                                                        f"mid depth {self.transformer_depth_middle}")
        return (f"{self.family.upper()} UNet, {self.levels} levels, channels {self.model_channels}×"
                f"{list(self.channel_mult)}, res blocks {list(self.num_res_blocks)}, "
                f"depths in {list(self.transformer_depth)} / out {self.output_depths()}, {mid}")


def family_of(context_dim: int, adm_in_channels: int | None) -> str | None:
    fam = CONTEXT_FAMILY.get(context_dim)
    if fam == "sdxl" and adm_in_channels != SDXL_ADM:
        return None
    if fam in ("sd1", "sd2") and adm_in_channels:
        return None  # unCLIP / other class-conditioned variants: not a family this pack builds
    return fam


def from_comfy_config(cfg: dict, family: str | None = None) -> Topology:
    """Build a Topology from a ComfyUI ldm unet_config (as in the reference tables)."""
    adm = cfg.get("adm_in_channels")
    fam = family or family_of(cfg["context_dim"], adm)
    dsa = cfg.get("disable_self_attentions")
    return Topology(
        family=fam,
        model_channels=cfg["model_channels"],
        channel_mult=tuple(cfg["channel_mult"]),
        num_res_blocks=tuple(cfg["num_res_blocks"]),
        transformer_depth=tuple(cfg["transformer_depth"]),
        transformer_depth_output=tuple(cfg["transformer_depth_output"]),
        transformer_depth_middle=cfg["transformer_depth_middle"],
        context_dim=cfg["context_dim"],
        use_linear=cfg["use_linear_in_transformer"],
        adm_in_channels=adm,
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        disable_self_attn=tuple(dsa) if dsa else None,
    )
