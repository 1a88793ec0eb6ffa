"""The one diffusers <-> ldm name map: every structural unit of a UNet and every weight-bearing module in it.

A *unit* is what the BK-SDM / SDXL block-removal recipes add or remove and what a block map pairs:
a resnet, an attention (SpatialTransformer / Transformer2DModel), a down- or up-sampler, or one of
the stem modules (conv_in, time embedding, class/ADM embedding, output head). Units are laid out
exactly as ComfyUI's ``openaimodel.UNetModel`` builds them (ldm names) and as diffusers'
``UNet2DConditionModel`` builds them (diffusers names), for any :class:`~.topology.Topology`,
including uneven resnets per level (where ``comfy.utils.unet_to_diffusers`` is wrong).

Detection renames diffusers files with :func:`module_map`, the LoRA mapper reads both spellings
through it, and the student builder and the distiller address blocks through :func:`units`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .topology import Topology

#: diffusers resnet part -> ldm ResBlock part
RESNET_PARTS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
#: transformer-block parts (the same name in both layouts)
TBLOCK_PARTS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
#: attention parts outside the transformer blocks (same name in both layouts)
ATTN_PARTS = ("norm", "proj_in", "proj_out")


@dataclass(frozen=True)
class Unit:
    """One structural unit. ``side`` is "in", "mid", "out" or "stem"; ``level`` counts from the
    shallowest level; ``index`` is the position inside that level's stage (resnet pair) on its side."""
    kind: str          # "resnet" | "attention" | "downsample" | "upsample" | "stem"
    side: str
    level: int | None
    index: int | None
    ldm: str           # module prefix under ComfyUI's diffusion_model
    diffusers: str     # module prefix under diffusers' UNet2DConditionModel
    depth: int = 0     # transformer blocks (attention units)
    shortcut: bool = False  # resnet with a 1x1 skip projection (input width != output width)

    @property
    def modules(self) -> list[tuple[str, str]]:
        """(diffusers module, ldm module) for every weight-bearing module of the unit."""
        d, ld = self.diffusers, self.ldm
        if self.kind == "resnet":
            return [(f"{d}.{a}", f"{ld}.{b}") for a, b in RESNET_PARTS if self.shortcut or a != "conv_shortcut"]
        if self.kind == "attention":
            out = [(f"{d}.{a}", f"{ld}.{a}") for a in ATTN_PARTS]
            for t in range(self.depth):
                out += [(f"{d}.transformer_blocks.{t}.{a}", f"{ld}.transformer_blocks.{t}.{a}") for a in TBLOCK_PARTS]
            return out
        return [(d, ld)]


_STEM_HEAD = (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
              ("time_embedding.linear_2", "time_embed.2"))
_STEM_ADM = (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"))
_STEM_TAIL = (("conv_norm_out", "out.0"), ("conv_out", "out.2"))
#: other diffusers spellings of the same stem modules (SD2 unCLIP-style class embedding)
STEM_ALIASES = {"class_embedding.linear_1": "add_embedding.linear_1",
                "class_embedding.linear_2": "add_embedding.linear_2"}


@lru_cache(maxsize=64)
def units(t: Topology) -> tuple[Unit, ...]:
    """Every unit of ``t`` in the order ComfyUI's ``UNetModel`` builds them."""
    out = [Unit("stem", "stem", None, None, ld, d) for d, ld in _STEM_HEAD]
    if t.adm_in_channels:
        out += [Unit("stem", "stem", None, None, ld, d) for d, ld in _STEM_ADM]
    depths_in = iter(t.transformer_depth)
    depths_out = iter(t.output_depths())
    ch = t.model_channels
    skips = [ch]
    k = 1
    for level in range(t.levels):
        width = t.level_channels(level)
        for j in range(t.num_res_blocks[level]):
            out.append(Unit("resnet", "in", level, j, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}",
                            shortcut=ch != width))
            ch = width
            d = next(depths_in)
            if d:
                out.append(Unit("attention", "in", level, j, f"input_blocks.{k}.1",
                                f"down_blocks.{level}.attentions.{j}", depth=d))
            skips.append(ch)
            k += 1
        if level != t.levels - 1:
            out.append(Unit("downsample", "in", level, None, f"input_blocks.{k}.0.op",
                            f"down_blocks.{level}.downsamplers.0.conv"))
            skips.append(ch)
            k += 1
    mid = t.transformer_depth_middle
    if mid >= -1:
        out.append(Unit("resnet", "mid", None, 0, "middle_block.0", "mid_block.resnets.0"))
        if mid >= 0:
            out.append(Unit("attention", "mid", None, 1, "middle_block.1", "mid_block.attentions.0", depth=mid))
            out.append(Unit("resnet", "mid", None, 2, "middle_block.2", "mid_block.resnets.1"))
    k = 0
    for level in reversed(range(t.levels)):
        u = t.levels - 1 - level
        width = t.level_channels(level)
        n = t.num_res_blocks[level] + 1
        for j in range(n):
            out.append(Unit("resnet", "out", level, j, f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}",
                            shortcut=ch + skips.pop() != width))
            ch = width
            d = next(depths_out)
            if d:
                out.append(Unit("attention", "out", level, j, f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}",
                                depth=d))
            if level and j == n - 1:
                out.append(Unit("upsample", "out", level, None, f"output_blocks.{k}.{2 if d else 1}.conv",
                                f"up_blocks.{u}.upsamplers.0.conv"))
            k += 1
    out += [Unit("stem", "stem", None, None, ld, d) for d, ld in _STEM_TAIL]
    return tuple(out)


@lru_cache(maxsize=64)
def module_map(t: Topology) -> dict[str, str]:
    """{diffusers module path: ldm module path} for every weight-bearing module of ``t`` (no ``.weight``)."""
    return {d: ld for u in units(t) for d, ld in u.modules}


@lru_cache(maxsize=64)
def ldm_module_map(t: Topology) -> dict[str, str]:
    """{ldm module path: diffusers module path}: the inverse of :func:`module_map`."""
    return {ld: d for d, ld in module_map(t).items()}


def split_param(key: str) -> tuple[str, str]:
    """('module.path', 'weight') from 'module.path.weight'."""
    module, _, param = key.rpartition(".")
    return module, param


def diffusers_key_to_ldm(key: str, t: Topology) -> str | None:
    """The ComfyUI (ldm) name of one diffusers tensor name, or None when ``t`` has no such module."""
    module, param = split_param(key)
    for a, b in STEM_ALIASES.items():
        if module == a:
            module = b
    ld = module_map(t).get(module)
    return f"{ld}.{param}" if ld is not None else None


@lru_cache(maxsize=64)
def unit_index(t: Topology) -> dict[str, Unit]:
    """{ldm unit prefix: unit}."""
    return {u.ldm: u for u in units(t)}


def unit_of(key: str, t: Topology) -> Unit | None:
    """The unit an ldm tensor or module name belongs to (longest matching unit prefix)."""
    idx = unit_index(t)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        u = idx.get(".".join(parts[:n]))
        if u is not None:
            return u
    return None
