"""A structural description of an SD-style UNet, in the terms ComfyUI's ``UNetModel`` is built from.

Everything the loader detects ends up here; everything the nodes build comes from here. The
fields mirror ComfyUI's ldm ``unet_config`` (``comfy.model_detection.detect_unet_config``), with two
conventions made explicit:

* ``transformer_depth`` has one entry per *input* ResBlock, in input order;
* ``transformer_depth_output`` has one entry per *output* block in **ComfyUI's order**: the
  constructor pops from the end, so the LAST element belongs to ``output_blocks.0``.
  :meth:`Topology.output_depths` gives them in ``output_blocks`` order.

:func:`diffusers_config` writes the same structure as a diffusers ``UNet2DConditionModel`` config
(what the tests and benches build their reference models from).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
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
        """Per level (shallowest first), the depth of each of its input blocks."""
        out, i = [], 0
        for n in self.num_res_blocks:
            out.append(list(self.transformer_depth[i:i + n]))
            i += n
        return out

    def output_depths_by_level(self) -> list[list[int]]:
        """Per level (shallowest first), the depth of each of its output blocks in ``output_blocks`` order."""
        depths = self.output_depths()
        out, i = [None] * self.levels, 0
        for level in reversed(range(self.levels)):
            n = self.num_res_blocks[level] + 1
            out[level] = depths[i:i + n]
            i += n
        return out

    @property
    def heads_config(self) -> dict:
        """Heads as ComfyUI's model classes set them: SD15 uses 8 heads, SD20/SDXL 64-wide heads."""
        if self.family == "sd1":
            return {"num_heads": 8, "num_head_channels": -1}
        return {"num_heads": -1, "num_head_channels": 64}

    def with_width(self, model_channels: int) -> "Topology":
        """The same structure at another base width (tests and benches use tiny widths)."""
        return replace(self, model_channels=model_channels)

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
        dsa = tuple(self.disable_self_attn) if self.disable_self_attn and any(self.disable_self_attn) else ()
        return (self.family, self.model_channels, self.channel_mult, self.num_res_blocks,
                self.transformer_depth, self.transformer_depth_output, self.transformer_depth_middle,
                self.context_dim, self.use_linear, self.adm_in_channels, self.in_channels, dsa)

    def describe(self) -> str:
        mid = {-1: "resnet-only mid", -2: "no mid"}.get(self.transformer_depth_middle,
                                                        f"mid depth {self.transformer_depth_middle}")
        return (f"{self.family.upper()} UNet, {self.levels} levels, channels {self.model_channels}×"
                f"{list(self.channel_mult)}, res blocks {list(self.num_res_blocks)}, "
                f"depths in {list(self.transformer_depth)} / out {self.output_depths()}, {mid}")


#: bounds far beyond any SD-style UNet, that keep a structure read from a file from driving loops and
#: allocations (levels, res blocks per level, transformer depth, widths)
LIMITS = {"levels": 8, "res_blocks": 16, "depth": 64, "width": 65536, "mult": 64}


def whole(v, lo: int = 0, hi: int | None = None) -> bool:
    """``v`` is an integer (not a bool) in ``[lo, hi]``: a size or count read from a file."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)


def problem(t: Topology) -> str | None:
    """Why ``t`` (read from a file: a block map, a config) cannot be a UNet structure; None when it can."""
    ints = whole

    def int_tuple(v, lo: int, hi: int) -> bool:
        return isinstance(v, tuple) and all(ints(x, lo, hi) for x in v)

    lim = LIMITS
    if t.family not in FAMILIES:
        return f"family {t.family!r} is not one of {', '.join(FAMILIES)}"
    if not int_tuple(t.channel_mult, 1, lim["mult"]) or not 1 <= len(t.channel_mult) <= lim["levels"]:
        return f"channel_mult {t.channel_mult!r} is not 1 to {lim['levels']} multipliers"
    if not int_tuple(t.num_res_blocks, 0, lim["res_blocks"]) or len(t.num_res_blocks) != t.levels:
        return f"num_res_blocks {t.num_res_blocks!r} does not give 0 to {lim['res_blocks']} blocks per level"
    n_in = sum(t.num_res_blocks)
    if not int_tuple(t.transformer_depth, 0, lim["depth"]) or len(t.transformer_depth) != n_in:
        return f"transformer_depth {t.transformer_depth!r} does not give a depth per input block"
    if not int_tuple(t.transformer_depth_output, 0, lim["depth"]) or \
            len(t.transformer_depth_output) != n_in + t.levels:
        return f"transformer_depth_output {t.transformer_depth_output!r} does not give a depth per output block"
    if not ints(t.transformer_depth_middle, -2, lim["depth"]):
        return f"transformer_depth_middle {t.transformer_depth_middle!r} is out of range"
    for name in ("model_channels", "context_dim", "in_channels", "out_channels"):
        if not ints(getattr(t, name), 1, lim["width"]):
            return f"{name} {getattr(t, name)!r} is out of range"
    if t.adm_in_channels is not None and not ints(t.adm_in_channels, 1, lim["width"]):
        return f"adm_in_channels {t.adm_in_channels!r} is out of range"
    if not isinstance(t.use_linear, bool):
        return f"use_linear {t.use_linear!r} is not true or false"
    if t.disable_self_attn is not None and not (isinstance(t.disable_self_attn, tuple) and all(
            isinstance(x, bool) for x in t.disable_self_attn)):
        return f"disable_self_attn {t.disable_self_attn!r} is not a list of true/false"
    return None


def family_of(context_dim: int, adm_in_channels: int | None) -> str | None:
    """'sd1', 'sd2' or 'sdxl' from the cross-attention width and the class/ADM input; None for other models."""
    fam = CONTEXT_FAMILY.get(context_dim)
    if fam == "sdxl" and adm_in_channels != SDXL_ADM:
        return None
    if fam in ("sd1", "sd2") and adm_in_channels:
        return None  # unCLIP / other class-conditioned variants: not a family this pack builds
    return fam


def from_comfy_config(cfg: dict, family: str | None = None) -> Topology:
    """A Topology from a ComfyUI ldm unet_config (``model.model_config.unet_config`` of a loaded model)."""
    adm = cfg.get("adm_in_channels")
    fam = family or family_of(cfg["context_dim"], adm)
    dsa = cfg.get("disable_self_attentions")
    nrb = cfg["num_res_blocks"]
    nrb = (nrb,) * len(cfg["channel_mult"]) if isinstance(nrb, int) else tuple(nrb)
    mid = cfg.get("transformer_depth_middle")
    return Topology(
        family=fam,
        model_channels=cfg["model_channels"],
        channel_mult=tuple(cfg["channel_mult"]),
        num_res_blocks=nrb,
        transformer_depth=tuple(cfg["transformer_depth"]),
        transformer_depth_output=tuple(cfg["transformer_depth_output"]),
        transformer_depth_middle=cfg["transformer_depth"][-1] if mid is None else mid,
        context_dim=cfg["context_dim"],
        use_linear=cfg["use_linear_in_transformer"],
        adm_in_channels=adm,
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        disable_self_attn=tuple(dsa) if dsa and any(dsa) else None,
    )


def diffusers_config(t: Topology) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of ``t`` (heads as ComfyUI builds them).

    Raises ``ValueError`` for structures diffusers cannot express (a level whose input blocks mix
    attention and no attention, or a middle depth other than the deepest level's when both exist).
    """
    boc = [t.level_channels(i) for i in range(t.levels)]
    ins, outs = t.input_depths_by_level(), t.output_depths_by_level()
    down_types, up_types, tlpb, reverse = [], [], [], []
    for level in range(t.levels):
        d_in, d_out = ins[level], outs[level]
        if len(set(d_in)) > 1 or (any(d_out) and not all(d_out)) or (any(d_in) != any(d_out) and any(d_in)):
            raise ValueError(f"level {level} mixes attention depths {d_in} / {d_out}: not a diffusers structure")
        attn = bool(d_out[0]) if d_out else False
        down_types.append("CrossAttnDownBlock2D" if d_in and d_in[0] else "DownBlock2D")
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
        tlpb.append(d_in[0] if d_in and d_in[0] else (d_out[0] if attn else 1))
        reverse.append(d_out[0] if len(set(d_out)) == 1 else list(d_out))
    mid = t.transformer_depth_middle
    if mid >= 0:
        if down_types[-1] == "CrossAttnDownBlock2D" and tlpb[-1] != mid:
            raise ValueError(f"middle depth {mid} differs from the deepest level's {tlpb[-1]}")
        tlpb[-1] = mid
    up_rev = list(reversed(reverse))
    symmetric = all(r == (tlpb[t.levels - 1 - i] if up_types[i] == "CrossAttnUpBlock2D" else r)
                    for i, r in enumerate(up_rev))
    nrb = list(t.num_res_blocks)
    sd1 = t.family == "sd1"
    cfg = {
        "in_channels": t.in_channels, "out_channels": t.out_channels, "sample_size": 128 if t.family == "sdxl" else 64,
        "block_out_channels": boc, "layers_per_block": nrb[0] if len(set(nrb)) == 1 else nrb,
        "down_block_types": down_types, "up_block_types": list(reversed(up_types)),
        "cross_attention_dim": t.context_dim, "use_linear_projection": t.use_linear,
        "attention_head_dim": 8 if sd1 else [c // 64 for c in boc],
        "transformer_layers_per_block": tlpb[0] if len(set(tlpb)) == 1 else tlpb,
        "reverse_transformer_layers_per_block": None if symmetric else up_rev,
        "mid_block_type": {-1: "UNetMidBlock2D", -2: None}.get(mid, "UNetMidBlock2DCrossAttn"),
        "only_cross_attention": list(t.disable_self_attn) if t.disable_self_attn else False,
        "upcast_attention": False,
    }
    if t.adm_in_channels:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=t.adm_in_channels)
    return cfg
