"""Structural detection: from tensor names and shapes (or a diffusers config.json) to a Topology.

Three on-disk layouts are understood:

* **diffusers** (``down_blocks.*``, ``mid_block.*``, ``up_blocks.*``), as the students ship;
* **ldm contiguous** (``input_blocks.N`` numbered the way ComfyUI builds and saves UNets);
* **ldm gapped**: single files written by diffusers' ``convert_diffusers_to_original_*.py``, which
  keep the teacher's three-per-stage numbering with holes (``input_blocks`` 0,1,3,4,6,7, …) and
  park each up-sampler in an output block of its own. Blocks are re-indexed by position.

Nothing here looks a model up in a list: levels, resnets, attentions, transformer depths, the middle
block, context width and projection kind are all counted from the tensors. Only then does the
registry put a name on the result.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import NotAUNetError
from .names import diffusers_key_to_ldm
from .topology import LIMITS, SDXL_ADM, Topology, family_of, whole

Shapes = dict  # key -> tuple of ints

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.", "model.model.", "model.")


@dataclass
class Detection:
    topology: Topology
    layout: str  # "diffusers" | "ldm" | "ldm-gapped"
    prefix: str  # the prefix stripped from every UNet key ("" when none)
    key_map: dict  # file key (prefix stripped) -> ComfyUI ldm key (no prefix), for every UNet tensor


# ------------------------------------------------------------------------------------------------
# layout and prefix
# ------------------------------------------------------------------------------------------------

def _classify_non_unet(keys) -> str | None:
    """A short name for what these tensors are when they are not a UNet."""
    ks = list(keys)

    def any_has(*frags):
        return any(any(f in k for f in frags) for k in ks)

    if any_has("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "_lora.", "hada_w1", "lokr_w1"):
        return "a LoRA"
    if any(k.startswith(("control_model.", "controlnet_")) for k in ks) or any_has("input_hint_block",
                                                                                     "zero_convs"):
        return "a ControlNet"
    if any(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in ks):
        return "a VAE"
    if any_has("text_model.", "resblocks.", "token_embedding", "encoder.block.", "shared.weight",
               "text_projection", "embed_tokens"):
        return "a text encoder"
    if any_has("double_blocks.", "single_blocks.", "joint_blocks.", "x_embedder", "patch_embed"):
        return "a transformer (DiT) diffusion model, not an SD-style UNet"
    return None


def split_prefix(keys) -> tuple[str, str]:
    """Return (prefix, layout) for the UNet keys in ``keys``; layout is 'diffusers' or 'ldm'."""
    keys = list(keys)
    for prefix in ("",) + UNET_PREFIXES:
        n = len(prefix)
        for k in keys:
            if not k.startswith(prefix):
                continue
            rest = k[n:]
            if rest.startswith("input_blocks.0.0.weight"):
                return prefix, "ldm"
            if rest.startswith("conv_in.weight") and any(x[n:].startswith("down_blocks.") for x in keys
                                                         if x.startswith(prefix)):
                return prefix, "diffusers"
    what = _classify_non_unet(keys)
    if what:
        raise NotAUNetError(f"this file holds {what}, not a diffusion UNet",
                            _fix_for(what))
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    raise NotAUNetError(f"no UNet tensors found (no 'input_blocks.0.0.weight' or 'conv_in.weight'; "
                        f"first keys: {sample})",
                        "choose a UNet file (diffusers 'unet/' folder or an SD/SDXL single file)")


def _fix_for(what: str) -> str:
    if what == "a LoRA":
        return "load it with 'Distilled LoRA Loader' on top of a UNet instead"
    if what == "a VAE":
        return "load it with ComfyUI's 'Load VAE' node (models/vae) and pick the UNet file here"
    if what == "a text encoder":
        return "load it with ComfyUI's 'Load CLIP' node (models/text_encoders) and pick the UNet file here"
    if what == "a ControlNet":
        return "load it with ComfyUI's 'Load ControlNet Model' node"
    return "load it with ComfyUI's own 'Load Diffusion Model' node"


# ------------------------------------------------------------------------------------------------
# diffusers layout
# ------------------------------------------------------------------------------------------------

def _count(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    found = set()
    for k in shapes:
        m = rx.match(k)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def _depth(shapes: Shapes, prefix: str) -> int:
    return len(_count(shapes, re.escape(prefix) + r"transformer_blocks\.(\d+)\."))


def _first(shapes: Shapes, suffix: str):
    for k in sorted(shapes):
        if k.endswith(suffix):
            return k, shapes[k]
    return None, None


def _attn_facts(shapes: Shapes) -> tuple[int, bool]:
    """Context width (attn2.to_k in-dim) and whether proj_in is linear."""
    k, s = _first(shapes, "attn2.to_k.weight")
    if k is None:
        raise NotAUNetError("the UNet has no cross-attention (no 'attn2.to_k' tensor), so it cannot take "
                            "a text prompt", "choose a text-to-image SD, SD2 or SDXL-family UNet")
    _, p = _first(shapes, "proj_in.weight")
    return s[1], (p is not None and len(p) == 2)


def _family(context_dim: int, adm: int | None) -> str:
    fam = family_of(context_dim, adm)
    if fam is None:
        raise NotAUNetError(f"a UNet with context width {context_dim} and class/ADM input {adm} belongs to "
                            f"no supported family (SD1: 768, SD2: 1024, SDXL: 2048 + {SDXL_ADM})",
                            "use ComfyUI's own 'Load Diffusion Model' node for other model families")
    return fam


def from_diffusers(shapes: Shapes) -> Topology:
    """The Topology of diffusers-layout tensors (prefix already stripped), counted from their names."""
    mc, in_ch = shapes["conv_in.weight"][0], shapes["conv_in.weight"][1]
    out_ch = shapes["conv_out.weight"][0] if "conv_out.weight" in shapes else in_ch
    levels = _count(shapes, r"down_blocks\.(\d+)\.")
    up_levels = _count(shapes, r"up_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))) or up_levels != list(range(len(levels))):
        raise NotAUNetError(f"down_blocks {levels} and up_blocks {up_levels} do not form a UNet",
                            "the file is incomplete or not a diffusers UNet; re-download it")
    n = len(levels)
    chans, nrb, depth = [], [], []
    dsa = []
    for i in range(n):
        res = _count(shapes, rf"down_blocks\.{i}\.resnets\.(\d+)\.")
        if not res:
            raise NotAUNetError(f"down_blocks.{i} has no resnets", "the file is not a complete UNet")
        ch = shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0]
        chans.append(ch)
        nrb.append(len(res))
        for j in range(len(res)):
            depth.append(_depth(shapes, f"down_blocks.{i}.attentions.{j}."))
        k1 = f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        dsa.append(k1 in shapes and shapes[k1][1] != shapes[k1][0])
        if f"down_blocks.{i}.downsamplers.0.conv.weight" in shapes:
            if i == n - 1:
                raise NotAUNetError("the deepest down block has a downsampler", "not a supported UNet")
        elif i < n - 1:
            raise NotAUNetError(f"down_blocks.{i} has no downsampler", "the file is not a complete UNet")

    # middle
    if "mid_block.attentions.0.proj_in.weight" in shapes:
        mid = _depth(shapes, "mid_block.attentions.0.")
    elif "mid_block.resnets.0.conv1.weight" in shapes:
        if "mid_block.resnets.1.conv1.weight" in shapes:
            raise NotAUNetError("the middle block has two resnets and no attention, which ComfyUI's UNet "
                                "cannot build", "use a UNet whose middle block is full, resnet-only or absent")
        mid = -1
    else:
        mid = -2

    # up side: level i of up_blocks mirrors down level n-1-i
    out_depths = []
    for i in range(n):
        level = n - 1 - i
        res = _count(shapes, rf"up_blocks\.{i}\.resnets\.(\d+)\.")
        if len(res) != nrb[level] + 1:
            raise NotAUNetError(f"up_blocks.{i} has {len(res)} resnets but down level {level} has "
                                f"{nrb[level]}; ComfyUI's UNet needs exactly one more on the way up",
                                "this asymmetric structure is not supported")
        for j in range(len(res)):
            out_depths.append(_depth(shapes, f"up_blocks.{i}.attentions.{j}."))

    if any(c % mc for c in chans):
        raise NotAUNetError(f"level widths {chans} are not multiples of the first ({mc})", "not a supported UNet")
    context_dim, linear = _attn_facts(shapes)
    adm = None
    for k in ("add_embedding.linear_1.weight", "class_embedding.linear_1.weight"):
        if k in shapes:
            adm = shapes[k][1]
    return Topology(
        family=_family(context_dim, adm), model_channels=mc, channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=tuple(nrb), transformer_depth=tuple(depth),
        transformer_depth_output=tuple(reversed(out_depths)), transformer_depth_middle=mid,
        context_dim=context_dim, use_linear=linear, adm_in_channels=adm, in_channels=in_ch,
        out_channels=out_ch, disable_self_attn=tuple(dsa) if any(dsa) else None)


# ------------------------------------------------------------------------------------------------
# ldm layout (contiguous or gapped)
# ------------------------------------------------------------------------------------------------

def from_ldm(shapes: Shapes) -> tuple[Topology, dict, bool]:
    """Topology, gapped->contiguous key map and whether the numbering had holes."""
    blocks = defaultdict(set)  # ("input"|"output", idx) -> set of sub-keys
    for k in shapes:
        m = re.match(r"^(input|output)_blocks\.(\d+)\.(.*)$", k)
        if m:
            blocks[(m.group(1), int(m.group(2)))].add(m.group(3))
    ins = sorted(i for (kind, i) in blocks if kind == "input")
    outs = sorted(i for (kind, i) in blocks if kind == "output")
    if not ins or ins[0] != 0:
        raise NotAUNetError("input_blocks.0 (conv_in) is missing", "the file is incomplete; re-download it")
    mc, in_ch = shapes["input_blocks.0.0.weight"][0], shapes["input_blocks.0.0.weight"][1]

    def has(kind, i, sub):
        return any(s.startswith(sub) for s in blocks[(kind, i)])

    renum: dict[str, str] = {}
    chans, nrb, depth, dsa = [], [], [], []
    cur_res, cur_dsa = 0, False
    new = 1
    for i in ins[1:]:
        if has("input", i, "0.op."):
            nrb.append(cur_res)
            dsa.append(cur_dsa)
            cur_res, cur_dsa = 0, False
        elif has("input", i, "0.in_layers."):
            d = _depth(shapes, f"input_blocks.{i}.1.")
            depth.append(d)
            cur_res += 1
            k1 = f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_k.weight"
            if k1 in shapes and shapes[k1][1] != shapes[k1][0]:
                cur_dsa = True
        else:
            raise NotAUNetError(f"input_blocks.{i} is neither a resnet nor a downsampler",
                                "the file is not a supported UNet")
        if i != new:
            renum[f"input_blocks.{i}."] = f"input_blocks.{new}."
        new += 1
    if cur_res == 0:
        raise NotAUNetError("the deepest level has no resnet", "the file is not a supported UNet")
    nrb.append(cur_res)
    dsa.append(cur_dsa)
    # the width of each level is the output width of its resnets (the downsampler keeps it)
    i_res = [i for i in ins[1:] if has("input", i, "0.in_layers.")]
    pos = 0
    for n_l in nrb:
        chans.append(shapes[f"input_blocks.{i_res[pos]}.0.out_layers.3.weight"][0])
        pos += n_l

    # output side: a block with a resnet starts an entry; an orphan up-sampler joins the previous one
    out_entries = []  # [old_idx, depth, upsampler (old_idx, sub) | None]
    for i in outs:
        if has("output", i, "0.in_layers."):
            d = _depth(shapes, f"output_blocks.{i}.1.")
            up = None
            for sub in (1, 2):
                if f"output_blocks.{i}.{sub}.conv.weight" in shapes:
                    up = (i, sub)
            out_entries.append([i, d, up])
        elif any(f"output_blocks.{i}.{sub}.conv.weight" in shapes for sub in (0, 1, 2)):
            if not out_entries or out_entries[-1][2] is not None:
                raise NotAUNetError(f"output_blocks.{i} holds an up-sampler with no resnet before it",
                                    "the file is not a supported UNet")
            sub = next(s for s in (0, 1, 2) if f"output_blocks.{i}.{s}.conv.weight" in shapes)
            out_entries[-1][2] = (i, sub)
        else:
            raise NotAUNetError(f"output_blocks.{i} is neither a resnet nor an up-sampler",
                                "the file is not a supported UNet")
    expected = sum(x + 1 for x in nrb)
    if len(out_entries) != expected:
        raise NotAUNetError(f"{len(out_entries)} output resnets for {expected} expected from the input side",
                            "the file is incomplete or its up side does not mirror the down side")
    # the up-samplers must close exactly the levels above the shallowest one
    pos = 0
    for lvl in reversed(range(len(nrb))):
        n_out = nrb[lvl] + 1
        for j in range(n_out):
            has_up = out_entries[pos + j][2] is not None
            if has_up != (j == n_out - 1 and lvl > 0):
                raise NotAUNetError("up-samplers sit in unexpected output blocks", "the file is not a supported UNet")
        pos += n_out
    out_depths = []
    for new_i, (old_i, d, up) in enumerate(out_entries):
        out_depths.append(d)
        if old_i != new_i:
            renum[f"output_blocks.{old_i}.0."] = f"output_blocks.{new_i}.0."
            if d:
                renum[f"output_blocks.{old_i}.1."] = f"output_blocks.{new_i}.1."
        if up is not None:
            want = f"output_blocks.{new_i}.{2 if d else 1}.conv."
            have = f"output_blocks.{up[0]}.{up[1]}.conv."
            if want != have:
                renum[have] = want

    if "middle_block.1.proj_in.weight" in shapes:
        mid = _depth(shapes, "middle_block.1.")
    elif "middle_block.0.in_layers.0.weight" in shapes:
        mid = -1
    else:
        mid = -2
    context_dim, linear = _attn_facts(shapes)
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    out_ch = shapes["out.2.weight"][0] if "out.2.weight" in shapes else in_ch
    if any(c % mc for c in chans):
        raise NotAUNetError(f"level widths {chans} are not multiples of the first ({mc})", "not a supported UNet")
    topo = Topology(
        family=_family(context_dim, adm), model_channels=mc, channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=tuple(nrb), transformer_depth=tuple(depth),
        transformer_depth_output=tuple(reversed(out_depths)), transformer_depth_middle=mid,
        context_dim=context_dim, use_linear=linear, adm_in_channels=adm, in_channels=in_ch,
        out_channels=out_ch, disable_self_attn=tuple(dsa) if any(dsa) else None)
    return topo, renum, bool(renum)


def convert_by_prefix(key: str, prefix_map: dict) -> str:
    """Apply the longest matching prefix of ``prefix_map`` to ``key`` (identity when none matches)."""
    best = ""
    for p in prefix_map:
        if key.startswith(p) and len(p) > len(best):
            best = p
    return prefix_map[best] + key[len(best):] if best else key


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------

def detect(shapes: Shapes) -> Detection:
    """Detect the UNet in ``shapes`` (file key -> shape) whatever its layout and prefix. Any table of shapes gives
    a Detection or a :class:`NotAUNetError`: a tensor the structure needs that is missing, or one with too few
    dimensions, is that error too."""
    try:
        return _detect(shapes)
    except NotAUNetError:
        raise
    except KeyError as e:
        raise NotAUNetError(f"the tensor '{e.args[0]}' that the detected structure needs is missing",
                            "the file is incomplete or damaged; download it again") from e
    except (IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise NotAUNetError(f"the tensors do not form a UNet: some have shapes no UNet layer has "
                            f"({type(e).__name__}: {str(e)[:80]})",
                            "the file is damaged or not a UNet; download it again") from e


def _detect(shapes: Shapes) -> Detection:
    prefix, layout = split_prefix(shapes)
    n = len(prefix)
    unet = {k[n:]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if layout == "diffusers":
        topo = from_diffusers(unet)
        key_map, unknown = {}, []
        for k in unet:
            new = diffusers_key_to_ldm(k, topo)
            if new is None:
                unknown.append(k)
            else:
                key_map[k] = new
        if unknown:
            raise NotAUNetError(f"{len(unknown)} tensors fit no block of the detected structure "
                                f"(e.g. {', '.join(unknown[:3])})",
                                "the file mixes layouts or is not a UNet; re-export it with diffusers")
        return Detection(topo, "diffusers", prefix, key_map)
    topo, renum, gapped = from_ldm(unet)
    key_map = {k: convert_by_prefix(k, renum) for k in unet} if gapped else {k: k for k in unet}
    return Detection(topo, "ldm-gapped" if gapped else "ldm", prefix, key_map)


def from_diffusers_config(config: dict) -> Topology:
    """Topology from a diffusers ``unet/config.json`` (structure only; no weights read)."""
    boc = list(config["block_out_channels"])
    n = len(boc)
    lpb = config.get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    if not (1 <= n <= LIMITS["levels"] and len(lpb) == n and all(whole(c, 1, LIMITS["width"]) for c in boc)
            and all(whole(x, 0, LIMITS["res_blocks"]) for x in lpb)):
        raise NotAUNetError("config.json has no usable block_out_channels / layers_per_block",
                            "download the folder's config.json again")
    mc = boc[0]
    tlpb = config.get("transformer_layers_per_block", 1)
    tlpb = list(tlpb) if isinstance(tlpb, (list, tuple)) else [tlpb] * n
    down_types = config["down_block_types"]
    up_types = config["up_block_types"]
    rev = config.get("reverse_transformer_layers_per_block")
    depth = []
    for i in range(n):
        t = tlpb[i] if "CrossAttn" in down_types[i] else 0
        for _ in range(lpb[i]):
            depth.append(t if isinstance(t, int) else t[_])
    out = []
    for i in range(n):
        level = n - 1 - i
        k = lpb[level] + 1
        for j in range(k):
            if "CrossAttn" not in up_types[i]:
                out.append(0)
            elif rev is not None:
                r = rev[i]
                out.append(r[j] if isinstance(r, (list, tuple)) else r)
            else:
                t = tlpb[level]
                out.append(t if isinstance(t, int) else t[min(j, len(t) - 1)])
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is None:
        mid = -2
    elif mid_type == "UNetMidBlock2D":
        mid = -1
    else:
        t = tlpb[-1]
        mid = t if isinstance(t, int) else t[-1]
    only_cross = config.get("only_cross_attention", False)
    dsa = list(only_cross) if isinstance(only_cross, (list, tuple)) else [bool(only_cross)] * n
    adm = config.get("projection_class_embeddings_input_dim") if config.get("addition_embed_type") else None
    ctx = config["cross_attention_dim"]
    ctx = ctx if isinstance(ctx, int) else ctx[0]
    return Topology(
        family=_family(ctx, adm), model_channels=mc, channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=tuple(lpb), transformer_depth=tuple(depth), transformer_depth_output=tuple(reversed(out)),
        transformer_depth_middle=mid, context_dim=ctx, use_linear=bool(config.get("use_linear_projection")),
        adm_in_channels=adm, in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        disable_self_attn=tuple(dsa) if any(dsa) else None)


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def condconv_paths(state_dict: Mapping, prefix: str = "") -> dict[str, int]:
    """The CondConv modules in a state dict (tensors, or shapes), found structurally: a ``<path>.weight``
    with 5 dims next to a ``<path>.routing_weight``. Returns ``{path: number of experts}`` with ``prefix``
    removed from the paths (keys outside ``prefix`` are ignored)."""
    out: dict[str, int] = {}
    suffix = ".routing_weight"
    for key in state_dict:
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        path = key[: -len(suffix)]
        w = state_dict.get(path + ".weight")
        if w is None:
            continue
        shape = _shape(w)
        if len(shape) == 5 and _shape(state_dict[key])[:1] == shape[:1]:
            out[path[len(prefix):]] = shape[0]
    return out
