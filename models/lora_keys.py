"""LoRA key normaliser: every common LoRA naming onto the loaded UNet's own ldm weight names.

Host-free (no ComfyUI import). The node hands the result to ComfyUI's ``comfy.lora.load_lora`` as
its ``to_load`` map (LoRA module prefix -> ``diffusion_model.<ldm path>.weight``), so ComfyUI's
own adapters (LoRA, LoHa, LoKr, GLoRA, OFT, BOFT) read the tensors and ComfyUI patches them.

Formats understood (module prefix, before the adapter suffix):

* kohya / sd-scripts ``lora_unet_<diffusers or ldm path with _>`` (+ ``.alpha``), SimpleTuner
  ``lycoris_<...>``;
* old diffusers ``[unet.]<path>.attn1.processor.to_q_lora.down.weight``;
* new diffusers ``unet.<path>.to_q.lora.down.weight`` and PEFT ``lora_A`` / ``lora_B`` with the
  ``unet.`` / ``base_model.model.`` prefixes; rank/alpha from the file's ``lora_adapter_metadata``
  or a PEFT ``adapter_config.json`` dict (written into the file as ``<prefix>.alpha``);
* ldm ``diffusion_model.<ldm path>`` (ComfyUI's generic format), LyCORIS LoCon/LoHa/LoKr.

Teacher -> student: a LoRA trained on the teacher (SD1.x/2.x or SDXL) names the teacher's blocks.
The plan tries both readings (the names are the student's own / the names are the teacher's) and
keeps the one that explains more keys. Under the teacher reading every module is moved block by
block onto the student (BK-SDM / segmind rules, see ``reference/distilled_unets.md`` §2), dropped
when its block was removed, or held back as *uncertain* when the student shrank that block in a
way whose teacher correspondence is not published (SDXL students). Nothing is ever applied to a
block it was not trained for, and nothing whose shape disagrees with the target.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# Teachers (ComfyUI ldm unet_config form; only the structural fields matter here)

SD1_TEACHER = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end
    "transformer_depth_middle": 1,
}
SDXL_TEACHER = {
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "adm_in_channels": 2816,
}
FAMILY_NAMES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def family_of(unet_config: dict) -> str:
    """'sdxl' or 'sd' (SD1.x and SD2.x share one block layout)."""
    if unet_config.get("adm_in_channels") or unet_config.get("context_dim") == 2048:
        return "sdxl"
    return "sd"


def teacher_config_for(student_config: dict) -> dict:
    """The teacher's structure for a student: SDXL for SDXL students, SD1.x/2.x otherwise."""
    return dict(SDXL_TEACHER if family_of(student_config) == "sdxl" else SD1_TEACHER)


def _family_name(context_dim) -> str:
    return FAMILY_NAMES.get(context_dim, f"context width {context_dim}")


# ---------------------------------------------------------------------------------------------
# ldm <-> diffusers module names, built from the config the way openaimodel.UNetModel builds
# (correct for non-uniform num_res_blocks, unlike comfy.utils.unet_to_diffusers: notes A5).

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
_TBLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _middle_depth(cfg: dict) -> int:
    m = cfg.get("transformer_depth_middle")
    if m is None:
        m = list(cfg["transformer_depth"])[-1]
    return int(m)


def _nrb(cfg: dict) -> list[int]:
    n = cfg["num_res_blocks"]
    if isinstance(n, int):
        return [n] * len(cfg["channel_mult"])
    return [int(x) for x in n]


def unet_module_map(unet_config: dict) -> dict[str, str]:
    """{diffusers module path: ldm module path} for every weight-bearing module of the UNet.

    Module paths carry no ``.weight``; ldm paths are relative to ``diffusion_model.``.
    """
    cm = list(unet_config["channel_mult"])
    nrb = _nrb(unet_config)
    td = list(unet_config["transformer_depth"])
    tdo = list(unet_config["transformer_depth_output"])
    out: dict[str, str] = {}

    def resnet(d, l_, shortcut):
        for a, b in _RESNET:
            out[f"{d}.{a}"] = f"{l_}.{b}"
        if shortcut:
            out[f"{d}.conv_shortcut"] = f"{l_}.skip_connection"

    def attn(d, l_, depth):
        for a in ("norm", "proj_in", "proj_out"):
            out[f"{d}.{a}"] = f"{l_}.{a}"
        for t in range(depth):
            for a in _TBLOCK:
                out[f"{d}.transformer_blocks.{t}.{a}"] = f"{l_}.transformer_blocks.{t}.{a}"

    out["conv_in"] = "input_blocks.0.0"
    out["time_embedding.linear_1"] = "time_embed.0"
    out["time_embedding.linear_2"] = "time_embed.2"
    if unet_config.get("adm_in_channels") or unet_config.get("num_classes") == "sequential":
        out["add_embedding.linear_1"] = "label_emb.0.0"
        out["add_embedding.linear_2"] = "label_emb.0.2"
    ch = cm[0]
    chans = [ch]
    k = 1
    for level, mult in enumerate(cm):
        for i in range(nrb[level]):
            resnet(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{k}.0", ch != mult)
            ch = mult
            d = td.pop(0)
            if d > 0:
                attn(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{k}.1", d)
            chans.append(ch)
            k += 1
        if level != len(cm) - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            chans.append(ch)
            k += 1
    m = _middle_depth(unet_config)
    if m >= -1:
        resnet("mid_block.resnets.0", "middle_block.0", False)
        if m >= 0:
            attn("mid_block.attentions.0", "middle_block.1", m)
            resnet("mid_block.resnets.1", "middle_block.2", False)
    k = 0
    for level, mult in list(enumerate(cm))[::-1]:
        u = len(cm) - 1 - level
        for i in range(nrb[level] + 1):
            skip = chans.pop()
            resnet(f"up_blocks.{u}.resnets.{i}", f"output_blocks.{k}.0", ch + skip != mult)
            ch = mult
            d = tdo.pop()
            layer = 1
            if d > 0:
                attn(f"up_blocks.{u}.attentions.{i}", f"output_blocks.{k}.1", d)
                layer = 2
            if level and i == nrb[level]:
                out[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{k}.{layer}.conv"
            k += 1
    out["conv_norm_out"] = "out.0"
    out["conv_out"] = "out.2"
    return out


def block_depths(unet_config: dict) -> dict[str, int]:
    """{diffusers attention path: transformer depth} for every attention of the UNet."""
    depths: dict[str, int] = {}
    for d in unet_module_map(unet_config):
        mt = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.", d)
        if mt:
            depths[mt.group(1)] = max(depths.get(mt.group(1), 0), int(mt.group(2)) + 1)
    return depths


# ---------------------------------------------------------------------------------------------
# File keys -> module prefixes

#: adapter suffixes ComfyUI's weight adapters read (longest first when matching)
ADAPTER_SUFFIXES = tuple(sorted((
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
    "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight", ".lora_B.default.weight", ".lora_A.default.weight",
    ".lora.up.weight", ".lora.down.weight", ".lora_B", ".lora_A",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".alpha", ".dora_scale", ".reshape_weight", ".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale",
), key=len, reverse=True))

TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_", "text_encoder.",
               "text_encoder_2.", "text_encoders.", "te.", "te1.", "te2.", "lora_te.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")
_DOTTED_PREFIXES = ("unet.base_model.model.", "base_model.model.unet.", "base_model.model.", "unet.",
                    "model.diffusion_model.", "diffusion_model.")
_LDM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_DIFFUSERS_HEADS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding", "add_embedding")


def split_key(key: str) -> tuple[str, str] | None:
    """(module prefix, adapter suffix) of one file key, or None when no adapter suffix fits."""
    for s in ADAPTER_SUFFIXES:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    return None


def _fmt_of(prefix: str, suffix: str) -> str:
    if suffix.startswith(".hada_"):
        return "loha"
    if suffix.startswith(".lokr_"):
        return "lokr"
    if prefix.startswith("lora_unet_"):
        return "kohya"
    if prefix.startswith("lycoris_"):
        return "lycoris"
    if prefix.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "ldm"
    if ".processor." in prefix or suffix.startswith("_lora."):
        return "diffusers-old"
    if suffix in (".lora_A.weight", ".lora_B.weight", ".lora_A", ".lora_B", ".lora_A.default.weight",
                  ".lora_B.default.weight"):
        return "peft"
    if suffix.startswith(".lora."):
        return "diffusers-new"
    return "other"


@dataclass(frozen=True)
class ParsedModule:
    prefix: str        # the module prefix exactly as in the file (what load_lora looks up)
    layout: str        # "diffusers" | "ldm"
    path: str          # dotted module path in that layout, without ".weight"


def _clean_dotted(path: str) -> str:
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out"):
        path += ".0"
    return path


def _layout_of(path: str) -> str | None:
    head = path.split(".", 1)[0]
    if head in _LDM_HEADS:
        return "ldm"
    if head in _DIFFUSERS_HEADS:
        return "diffusers"
    return None


def _underscore_table(configs: list[dict]) -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for cfg in configs:
        for d, l_ in unet_module_map(cfg).items():
            table.setdefault(d.replace(".", "_"), ("diffusers", d))
            table.setdefault(l_.replace(".", "_"), ("ldm", l_))
    return table


def parse_prefix(prefix: str, table: dict[str, tuple[str, str]]) -> ParsedModule | None:
    """A file module prefix -> (layout, dotted path), or None when it names no UNet module."""
    for p in _UNDERSCORE_PREFIXES:
        if prefix.startswith(p):
            hit = table.get(prefix[len(p):])
            return ParsedModule(prefix, hit[0], hit[1]) if hit else None
    body = prefix
    for p in _DOTTED_PREFIXES:
        if body.startswith(p):
            body = body[len(p):]
            break
    body = _clean_dotted(body)
    layout = _layout_of(body)
    if layout is None:
        return None
    return ParsedModule(prefix, layout, body)


def is_text_encoder(prefix: str) -> bool:
    return prefix.startswith(TE_PREFIXES)


# ---------------------------------------------------------------------------------------------
# Shapes

def _implied_shape(prefix: str, tensors: dict) -> tuple[int, int] | None:
    """(out_features, in_numel) of the weight a module's tensors patch, when it can be read."""
    def sh(name):
        t = tensors.get(prefix + name)
        return tuple(t.shape) if t is not None else None

    pairs = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
             (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
             (".lora_B", ".lora_A"), (".lora_B.default.weight", ".lora_A.default.weight"),
             (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
    for up, down in pairs:
        u, d = sh(up), sh(down)
        if u is not None and d is not None:
            if sh(".lora_mid.weight") is not None:
                return None
            return u[0], math.prod(d[1:])
    a, b = sh(".hada_w1_a"), sh(".hada_w1_b")
    if a is not None and b is not None and sh(".hada_t1") is None:
        return a[0], math.prod(b[1:])
    w1, w2 = sh(".lokr_w1"), sh(".lokr_w2")
    if w1 is not None and w2 is not None and len(w1) == 2:
        return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
    for s in (".diff", ".set_weight"):
        t = sh(s)
        if t is not None:
            return t[0], math.prod(t[1:])
    return None


def _model_shape(shape) -> tuple[int, int]:
    shape = tuple(shape)
    return shape[0], math.prod(shape[1:])


# ---------------------------------------------------------------------------------------------
# Teacher block -> student block

_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                       r"\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")
_TB_RE = re.compile(r"^transformer_blocks\.(\d+)\.")

# outcome kinds
MAPPED, REMOVED, UNCERTAIN, UNKNOWN = "mapped", "removed", "uncertain", "unknown"


def _pair_map(side: str, nt: int, ns: int, family: str) -> tuple[dict[int, int], bool]:
    """Teacher pair index -> student pair index within one stage, and whether that is certain."""
    count_t = nt if side == "down_blocks" else nt + 1
    count_s = ns if side == "down_blocks" else ns + 1
    if nt == ns:
        return {i: i for i in range(count_t)}, True
    # BK-SDM / segmind rule: down keeps the first pairs, up keeps the first and the last
    keep = {i: i for i in range(min(ns, count_t) if side == "down_blocks" else count_s - 1)}
    if side == "up_blocks" and count_s >= 1:
        keep[count_t - 1] = count_s - 1
    certain = family == "sd" and nt == 2 and ns == 1
    return keep, certain


def translate_teacher_path(path: str, teacher: dict, student: dict) -> tuple[str, str | None, str]:
    """One teacher diffusers module path -> (outcome, student diffusers path or None, why)."""
    family = family_of(student)
    lt, ls = len(teacher["channel_mult"]), len(student["channel_mult"])
    nt_all, ns_all = _nrb(teacher), _nrb(student)
    tdepth, sdepth = block_depths(teacher), block_depths(student)

    def attention_rest(t_block: str, s_block: str, rest: str | None, certain: bool):
        dt, ds = tdepth.get(t_block, 0), sdepth.get(s_block, 0)
        if ds == 0:
            return REMOVED, None, f"{s_block} has no attention in the student"
        mt = _TB_RE.match(rest or "")
        if mt and int(mt.group(1)) >= ds:
            return REMOVED, None, f"transformer block {mt.group(1)} removed (student depth {ds})"
        if dt != ds:
            return (UNCERTAIN, f"{s_block}.{rest}",
                    f"depth {dt}->{ds}: which teacher transformer blocks were kept is not published")
        if not certain:
            return (UNCERTAIN, f"{s_block}.{rest}",
                    "which teacher block pair the student kept is not published")
        return MAPPED, f"{s_block}.{rest}", ""

    m = _BLOCK_RE.match(path)
    if m:
        side, idx, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        level = idx if side == "down_blocks" else lt - 1 - idx
        if level >= ls:
            return REMOVED, None, f"level {level} removed"
        s_idx = level if side == "down_blocks" else ls - 1 - level
        s_side = f"{side}.{s_idx}"
        if kind in ("downsamplers", "upsamplers"):
            has = (level < ls - 1) if kind == "downsamplers" else level > 0
            if not has:
                return REMOVED, None, f"{side}.{idx}.{kind} removed"
            return MAPPED, f"{s_side}.{kind}.{j}" + (f".{rest}" if rest else ""), ""
        pmap, certain = _pair_map(side, nt_all[level], ns_all[level], family)
        if j not in pmap:
            return REMOVED, None, f"{side}.{idx}.{kind}.{j} removed (pair dropped)"
        s_block = f"{s_side}.{kind}.{pmap[j]}"
        if kind == "attentions":
            return attention_rest(f"{side}.{idx}.{kind}.{j}", s_block, rest, certain)
        outcome = MAPPED if certain else UNCERTAIN
        why = "" if certain else "which teacher block pair the student kept is not published"
        return outcome, f"{s_block}.{rest}" if rest else s_block, why
    m = _MID_RE.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        sm = _middle_depth(student)
        if sm <= -2:
            return REMOVED, None, "middle block removed"
        if kind == "resnets":
            if j == 0 or (j == 1 and sm >= 0):
                return MAPPED, path, ""
            return REMOVED, None, f"mid_block.resnets.{j} removed"
        if sm < 0:
            return REMOVED, None, "middle attention removed"
        return attention_rest(f"mid_block.attentions.{j}", f"mid_block.attentions.{j}", rest, True)
    return MAPPED, path, ""


# ---------------------------------------------------------------------------------------------
# The plan

@dataclass
class LoraPlan:
    """What to load where, and a full account of what was left out."""

    to_load: dict[str, str] = field(default_factory=dict)       # file prefix -> model weight key
    extra_alpha: dict[str, float] = field(default_factory=dict)  # file prefix -> alpha to add
    origin: str = "student"                                       # "student" | "teacher"
    formats: dict[str, int] = field(default_factory=dict)        # format -> module count
    removed: list[tuple[str, str]] = field(default_factory=list)     # (prefix, why)
    uncertain: list[tuple[str, str]] = field(default_factory=list)   # (prefix, why)
    shape_mismatch: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)              # file keys naming nothing we know
    text_encoder: list[str] = field(default_factory=list)         # file prefixes for the text encoder
    uncertain_applied: bool = False
    ambiguous: int = 0   # modules whose names fit the student and the teacher with different targets

    @property
    def unet_modules(self) -> int:
        return len(self.to_load) + len(self.removed) + len(self.uncertain) + len(self.shape_mismatch)

    def summary(self, examples: int = 3) -> str:
        def ex(items):
            items = [i if isinstance(i, str) else f"{i[0]} ({i[1]})" for i in items[:examples]]
            return ("; e.g. " + ", ".join(items)) if items else ""

        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())) or "none"
        lines = [
            f"UNet: applied {len(self.to_load)} of {self.unet_modules} modules "
            f"(LoRA names the {self.origin}'s blocks; formats: {fmts})",
        ]
        if self.uncertain_applied and self.uncertain:
            lines.append(f"applied although uncertain: {len(self.uncertain)}{ex(self.uncertain)}")
        elif self.uncertain:
            lines.append(f"held back, teacher correspondence uncertain: {len(self.uncertain)}"
                         f"{ex(self.uncertain)}")
        if self.removed:
            lines.append(f"dropped, block removed in the student: {len(self.removed)}{ex(self.removed)}")
        if self.shape_mismatch:
            lines.append(f"dropped, shape mismatch: {len(self.shape_mismatch)}{ex(self.shape_mismatch)}")
        if self.ambiguous:
            lines.append(f"note: {self.ambiguous} module names fit both this UNet and its teacher "
                         "(read as this UNet's own; a teacher LoRA normally also names blocks the "
                         "student lacks, which decides it)")
        if self.unknown:
            lines.append(f"unknown keys: {len(self.unknown)}{ex(self.unknown)}")
        return "\n".join(lines)


def peft_alpha_config(metadata: dict | None = None, adapter_config: dict | None = None) -> dict | None:
    """The PEFT LoraConfig fields (r, lora_alpha, alpha_pattern, use_rslora) from either source."""
    cfg = None
    if adapter_config:
        cfg = dict(adapter_config)
    elif metadata and metadata.get("lora_adapter_metadata"):
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
        except (TypeError, ValueError):
            raw = None
        if isinstance(raw, dict):
            cfg = {}
            for k, v in raw.items():
                for p in ("unet.", "transformer."):
                    if k.startswith(p):
                        k = k[len(p):]
                cfg.setdefault(k, v)
    if not cfg or "lora_alpha" not in cfg:
        return None
    return cfg


def _peft_alpha(module_path: str, cfg: dict, rank: int) -> float:
    alpha = float(cfg["lora_alpha"])
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module_path):
            alpha = float(a)
            break
    if cfg.get("use_rslora"):
        # PEFT scales by alpha/sqrt(r); ComfyUI by alpha/r
        alpha = alpha * math.sqrt(rank)
    return alpha


def _rank_of(prefix: str, tensors: dict) -> int | None:
    for s in (".lora_A.weight", ".lora_A", ".lora.down.weight", ".lora_A.default.weight"):
        t = tensors.get(prefix + s)
        if t is not None:
            return int(t.shape[0])
    return None


def plan_lora(tensors: dict, student_config: dict, model_shapes: dict, *, teacher_config: dict | None = None,
              metadata: dict | None = None, adapter_config: dict | None = None,
              apply_uncertain: bool = False, model_prefix: str = "diffusion_model.") -> LoraPlan:
    """Map a LoRA's keys onto a loaded UNet.

    ``tensors``: the LoRA file ({key: tensor}; only ``.shape`` is read). ``student_config``: the
    model's ComfyUI ldm unet_config. ``model_shapes``: {model state-dict key: shape} of the loaded
    model (keys start with ``model_prefix``). ``teacher_config`` defaults to the family's teacher.
    Raises nothing: the caller decides what an empty plan means.
    """
    teacher = teacher_config or teacher_config_for(student_config)
    s_map = unet_module_map(student_config)
    t_map = unet_module_map(teacher)
    s_ldm = set(s_map.values())
    t_ldm_to_d = {v: k for k, v in t_map.items()}
    t_diff = set(t_map)
    table = _underscore_table([student_config, teacher])

    plan = LoraPlan()
    modules: dict[str, str] = {}
    for key in tensors:
        sp = split_key(key)
        if sp is None:
            plan.unknown.append(key)
            continue
        if sp[1] not in (".alpha", ".dora_scale") or sp[0] not in modules:
            modules[sp[0]] = sp[1]
    parsed: list[ParsedModule] = []
    prefix_keys: dict[str, list[str]] = {}
    for key in tensors:
        sp = split_key(key)
        if sp:
            prefix_keys.setdefault(sp[0], []).append(key)
    for prefix, suffix in modules.items():
        if is_text_encoder(prefix):
            plan.text_encoder.append(prefix)
            continue
        pm = parse_prefix(prefix, table)
        if pm is None:
            plan.unknown.extend(prefix_keys[prefix])
            continue
        parsed.append(pm)
        fmt = _fmt_of(prefix, suffix)
        plan.formats[fmt] = plan.formats.get(fmt, 0) + 1

    def target_ok(ldm_path: str | None) -> str | None:
        if ldm_path is None:
            return None
        k = f"{model_prefix}{ldm_path}.weight"
        return k if k in model_shapes else None

    def shape_fits(prefix: str, key: str) -> bool:
        imp = _implied_shape(prefix, tensors)
        return imp is None or imp == _model_shape(model_shapes[key])

    # reading 1: the names are the student's own
    def as_student(pm: ParsedModule):
        ldm = s_map.get(pm.path) if pm.layout == "diffusers" else (pm.path if pm.path in s_ldm else None)
        return target_ok(ldm)

    # reading 2: the names are the teacher's
    def as_teacher(pm: ParsedModule):
        d = pm.path if pm.layout == "diffusers" else t_ldm_to_d.get(pm.path)
        if d is None or d not in t_diff:
            return UNKNOWN, None, "not a teacher module"
        outcome, s_d, why = translate_teacher_path(d, teacher, student_config)
        if outcome in (MAPPED, UNCERTAIN):
            key = target_ok(s_map.get(s_d))
            if key is None:
                return REMOVED, None, f"{s_d} does not exist in the student"
            return outcome, key, why
        return outcome, None, why

    student_score = sum(1 for pm in parsed if (k := as_student(pm)) and shape_fits(pm.prefix, k))
    teacher_res = {pm.prefix: as_teacher(pm) for pm in parsed}
    def teacher_explains(pm: ParsedModule) -> bool:
        outcome, key, _ = teacher_res[pm.prefix]
        return outcome != UNKNOWN and (key is None or shape_fits(pm.prefix, key))

    teacher_score = sum(1 for pm in parsed if teacher_explains(pm))
    same_structure = _structure(student_config) == _structure(teacher)
    plan.origin = "teacher" if (teacher_score > student_score and not same_structure) else "student"
    plan.uncertain_applied = apply_uncertain
    if plan.origin == "student" and not same_structure and teacher_score == student_score:
        plan.ambiguous = sum(1 for pm in parsed if teacher_res[pm.prefix][1] != as_student(pm))

    for pm in parsed:
        if plan.origin == "student":
            key = as_student(pm)
            if key is None:
                plan.removed.append((pm.prefix, "no such module in this UNet"))
                continue
        else:
            outcome, key, why = teacher_res[pm.prefix]
            if outcome == UNKNOWN:
                plan.unknown.extend(prefix_keys[pm.prefix])
                continue
            if outcome == REMOVED:
                plan.removed.append((pm.prefix, why))
                continue
            if outcome == UNCERTAIN:
                plan.uncertain.append((pm.prefix, why))
                if not apply_uncertain:
                    continue
        if not shape_fits(pm.prefix, key):
            plan.shape_mismatch.append((pm.prefix, f"{_implied_shape(pm.prefix, tensors)} vs "
                                                   f"{tuple(model_shapes[key])} at {key}"))
            continue
        plan.to_load[pm.prefix] = key

    # PEFT / new-diffusers files carry no .alpha: take it from the metadata or adapter config
    cfg = peft_alpha_config(metadata, adapter_config)
    if cfg:
        for prefix in plan.to_load:
            if prefix + ".alpha" in tensors:
                continue
            rank = _rank_of(prefix, tensors)
            if rank is None:
                continue
            pm = parse_prefix(prefix, table)
            plan.extra_alpha[prefix] = _peft_alpha(pm.path if pm else prefix, cfg, rank)
    return plan


def _structure(cfg: dict) -> tuple:
    return (tuple(_nrb(cfg)), len(cfg["channel_mult"]), tuple(cfg["transformer_depth"]),
            tuple(cfg["transformer_depth_output"]), _middle_depth(cfg))


def lora_context_dim(tensors: dict) -> int | None:
    """The cross-attention context width a LoRA was trained for (from attn2.to_k/to_v), if present."""
    for key, t in tensors.items():
        sp = split_key(key)
        if sp is None or is_text_encoder(sp[0]):
            continue
        p = sp[0].replace("_", ".")
        if re.search(r"attn2\.(processor\.)?to\.[kv]$", p):
            if sp[1] in (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight",
                         ".lora_A", ".lora_A.default.weight", ".lora_linear_layer.down.weight"):
                return int(t.shape[1])
    return None


def family_mismatch(tensors: dict, student_config: dict) -> str | None:
    """A sentence when the LoRA was trained for another model family (context width differs)."""
    ctx = lora_context_dim(tensors)
    want = student_config.get("context_dim")
    if ctx is None or want is None or ctx == want:
        return None
    return (f"the LoRA was trained for {_family_name(ctx)} (cross-attention width {ctx}) but the model is "
            f"{_family_name(want)} (width {want})")
