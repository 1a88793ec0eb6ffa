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
block onto the student by its block map (``models/structure/blockmap.py``: the BK-SDM / segmind rules), dropped
when its block was removed, or held back as *uncertain* when the student shrank that block in a
way whose teacher correspondence is not published (SDXL students). Nothing is ever applied to a
block it was not trained for, and nothing whose shape disagrees with the target.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

from ..errors import LoraError
from ..structure import names
from ..structure.blockmap import CERTAIN, BlockMap, derive
from ..structure.detect import condconv_paths
from ..structure.structures import TEACHERS
from ..structure.topology import CONTEXT_FAMILY, FAMILY_NAMES, Topology, from_comfy_config

# ---------------------------------------------------------------------------------------------
# Structures


def as_topology(model_config) -> Topology:
    """A :class:`Topology` from a Topology or a ComfyUI ldm ``unet_config`` (``model.model_config.unet_config``)."""
    return model_config if isinstance(model_config, Topology) else from_comfy_config(model_config)


def teacher_of(student: Topology) -> Topology:
    """The teacher structure of a student's family (SD1.x, SD2.x or SDXL), in the student's channels."""
    return replace(TEACHERS[student.family], in_channels=student.in_channels, out_channels=student.out_channels,
                   model_channels=student.model_channels)


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


def underscore_table(structures: list[Topology]) -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for t in structures:
        for d, l_ in names.module_map(t).items():
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

#: (up, down) suffixes of the plain LoRA namings ComfyUI's LoRA adapter reads, in its order
LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
              (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
              (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
              (".lora_B.default.weight", ".lora_A.default.weight"))
_LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
_LOKR = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
_GLORA = (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")
#: suffixes whose tensor replaces or adds to the weight (or its bias) as it is: its shape must be the target's
_WHOLE = (".diff", ".set_weight", ".w_norm")


def _shapes(prefix: str, tensors: dict) -> dict[str, tuple[int, ...]]:
    """{suffix: shape} of the adapter tensors of one module."""
    out = {}
    for s in ADAPTER_SUFFIXES:
        t = tensors.get(prefix + s)
        if t is not None:
            out[s] = tuple(getattr(t, "shape", ()))
    return out


def _matmul(a: tuple, b: tuple) -> tuple[int, int] | None:
    """The shape of ``a @ b`` (2-D each), or None when they do not multiply."""
    return (a[0], b[1]) if len(a) == 2 and len(b) == 2 and a[1] == b[0] else None


def _tucker(t: tuple, down: tuple, up: tuple) -> tuple | None:
    """LyCORIS' Tucker form ``einsum('i j k l, j r, i p -> p r k l', t, down, up)``, or None when it does not fit."""
    if len(t) == 4 and len(down) == 2 and len(up) == 2 and down[0] == t[1] and up[0] == t[0]:
        return (up[1], down[1], t[2], t[3])
    return None


def _kron(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x * y for x, y in zip(a, b))


def _adapter(prefix: str, tensors: dict) -> tuple[tuple | None, str | None]:
    """(shape of the weight change, problem) of one module's adapter tensors, checked the way ComfyUI's adapters
    (LoRA with or without a LoCon mid, LoHa, LoKr, GLoRA, OFT, BOFT, whole-weight diffs) will read and multiply
    them; they check nothing, so a missing or misshapen tensor ends in a KeyError while loading or an error (or a
    logged, skipped patch) while sampling. The shape is None where it cannot be read (GLoRA, OFT, BOFT)."""
    sh = _shapes(prefix, tensors)
    if ".alpha" in sh and math.prod(sh[".alpha"]) != 1:
        return None, f"alpha holds {math.prod(sh['.alpha'])} numbers, not one"
    kinds = [name for name, suffixes in (("LoRA", [s for p in LORA_PAIRS for s in p]), ("LoHa", _LOHA),
                                         ("LoKr", _LOKR), ("GLoRA", _GLORA), ("OFT", (".oft_blocks",)),
                                         ("diff", _WHOLE)) if any(s in sh for s in suffixes)]
    if len(kinds) > 1:  # ComfyUI would apply the last kind it reads, whole or not
        return None, f"tensors of several adapter kinds ({', '.join(kinds)})"
    for up, down in LORA_PAIRS:
        if up in sh or down in sh:
            if up not in sh or down not in sh:
                have, lack = (up, down) if up in sh else (down, up)
                return None, f"{have.lstrip('._')} without {lack.lstrip('._')}"
            u, d, m = sh[up], sh[down], sh.get(".lora_mid.weight") if up == ".lora_up.weight" else None
            if len(u) < 2 or len(d) < 2 or d[0] < 1:
                return None, f"{up.lstrip('._')} {list(u)} and {down.lstrip('._')} {list(d)} are no rank-r factors"
            if m is not None:  # LoCon with a mid kernel: down [r, in, 1, 1], mid [r, r, kh, kw]
                if len(m) != 4 or m[0] != d[0] or m[1] != d[0] or math.prod(d[2:]) != 1 or math.prod(u[1:]) != d[0]:
                    return None, f"lora_mid {list(m)} does not fit lora_down {list(d)} / lora_up {list(u)}"
                return (u[0], d[1], m[2], m[3]), None
            if math.prod(u[1:]) != d[0]:
                return None, f"{up.lstrip('._')} {list(u)} and {down.lstrip('._')} {list(d)} have different ranks"
            return (u[0], *d[1:]), None
    if any(s in sh for s in _LOHA):
        missing = [s for s in _LOHA if s not in sh]
        if missing or ((".hada_t1" in sh) != (".hada_t2" in sh)):
            return None, "LoHa tensors " + (", ".join(m.lstrip(".") for m in missing) or "hada_t1/t2") + " missing"
        if ".hada_t1" in sh:
            w1 = _tucker(sh[".hada_t1"], sh[".hada_w1_b"], sh[".hada_w1_a"])
            w2 = _tucker(sh[".hada_t2"], sh[".hada_w2_b"], sh[".hada_w2_a"])
        else:
            w1, w2 = _matmul(sh[".hada_w1_a"], sh[".hada_w1_b"]), _matmul(sh[".hada_w2_a"], sh[".hada_w2_b"])
        if w1 is None or w2 is None or w1 != w2 or not sh[".hada_w1_b"] or sh[".hada_w1_b"][0] < 1:
            return None, "LoHa factors do not multiply to one shape"
        return w1, None
    if any(s in sh for s in _LOKR):
        w1 = sh.get(".lokr_w1") or (_matmul(sh[".lokr_w1_a"], sh[".lokr_w1_b"])
                                    if ".lokr_w1_a" in sh and ".lokr_w1_b" in sh else None)
        if ".lokr_w2" in sh:
            w2 = sh[".lokr_w2"]
        elif ".lokr_w2_a" in sh and ".lokr_w2_b" in sh:
            w2 = (_tucker(sh[".lokr_t2"], sh[".lokr_w2_b"], sh[".lokr_w2_a"]) if ".lokr_t2" in sh
                  else _matmul(sh[".lokr_w2_a"], sh[".lokr_w2_b"]))
        else:
            w2 = None
        rank = sh.get(".lokr_w2_b", sh.get(".lokr_w1_b", (1,)))
        if w1 is None or w2 is None or (len(w2) == 4 and len(w1) != 2) or not rank or rank[0] < 1:
            return None, "LoKr factors are missing or do not multiply"
        return _kron(w1 + (1, 1) if len(w2) == 4 else w1, w2), None
    if any(s in sh for s in _GLORA):
        if not all(s in sh and len(sh[s]) >= 2 for s in _GLORA):
            return None, "GLoRA needs a1, a2, b1 and b2 (matrices)"
        a1, a2, b1, b2 = (sh[s] for s in _GLORA)  # ComfyUI reads its rank from one of these two layouts
        if not (b2[1] == b1[0] == a1[0] == a2[1] or b2[0] == b1[1] == a1[1] == a2[0]):
            return None, "GLoRA factors do not share a rank"
        return None, None
    for s in _WHOLE:
        if s in sh:
            return sh[s], None
    if ".oft_blocks" in sh:  # OFT: [blocks, size, size]; BOFT: [m, blocks, size, size]
        return None, None if len(sh[".oft_blocks"]) in (3, 4) else "oft_blocks is not a stack of blocks"
    if not (set(sh) - {".alpha", ".dora_scale", ".reshape_weight", ".rescale", ".diff_b", ".b_norm"}):
        if ".diff_b" in sh or ".b_norm" in sh:
            return None, None
        return None, "alpha or scale tensors without the adapter's own tensors"
    return None, None


def adapter_problem(prefix: str, tensors: dict) -> str | None:
    """Why the adapter tensors of one module cannot be applied by ComfyUI (None when they can)."""
    return _adapter(prefix, tensors)[1]


def implied_shape(prefix: str, tensors: dict) -> tuple[int, int] | None:
    """(out_features, in_numel) of the weight a module's tensors patch, when it can be read."""
    shape, problem = _adapter(prefix, tensors)
    return None if shape is None or problem or not shape else (shape[0], math.prod(shape[1:]))


def fits(prefix: str, tensors: dict, target: tuple[int, ...]) -> bool:
    """Whether a module's adapter tensors patch a weight of shape ``target``: the change has its size, and the
    tensors that act on the weight as they are (whole-weight diffs, DoRA scales, bias diffs) have its shape."""
    shape, problem = _adapter(prefix, tensors)
    if problem:
        return False
    target = tuple(target)
    sh = _shapes(prefix, tensors)
    if shape is not None and (shape[:1], math.prod(shape[1:])) != (target[:1], math.prod(target[1:])):
        return False
    if any(s in sh and sh[s] != target for s in _WHOLE):
        return False
    if ".reshape_weight" in sh:  # ComfyUI pads the weight to this shape first: only the weight's own is safe
        t = tensors[prefix + ".reshape_weight"]
        if t.numel() != len(target) or t.tolist() != list(target):
            return False
    dora = sh.get(".dora_scale")
    if dora is not None and dora not in ((target[0],) + (1,) * (len(target) - 1),
                                         (1,) + target[1:2] + (1,) * (len(target) - 2)):
        return False
    blocks = sh.get(".oft_blocks")
    if blocks is not None and len(blocks) == 3 and blocks[0] * blocks[1] != target[0]:
        return False
    return all(sh[s] == target[:1] for s in (".diff_b", ".b_norm") if s in sh)


# outcome kinds
MAPPED, REMOVED, UNCERTAIN, UNKNOWN = "mapped", "removed", "uncertain", "unknown"


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
    condconv: list[tuple[str, str]] = field(default_factory=list)     # (prefix, why): CondConv layers
    damaged: list[tuple[str, str]] = field(default_factory=list)      # (prefix, why): adapter tensors unusable
    damaged_text_encoder: list[tuple[str, str]] = field(default_factory=list)  # the same, text-encoder modules
    unknown: list[str] = field(default_factory=list)              # file keys naming nothing we know
    text_encoder: list[str] = field(default_factory=list)         # file prefixes for the text encoder
    uncertain_applied: bool = False
    ambiguous: int = 0   # modules whose names fit the student and the teacher with different targets

    @property
    def unet_modules(self) -> int:
        return (len(self.to_load) + len(self.removed) + len(self.uncertain) + len(self.shape_mismatch)
                + len(self.condconv) + len(self.damaged))

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
        damaged = self.damaged + self.damaged_text_encoder
        if damaged:
            lines.append(f"dropped, damaged in the file (adapter tensors missing or inconsistent): {len(damaged)}"
                         f"{ex(damaged)}")
        if self.condconv:
            lines.append(f"not LoRA-mappable, CondConv layers (several experts, no single kernel): "
                         f"{len(self.condconv)}{ex(self.condconv)}")
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
    problem = _alpha_problem(cfg)
    if problem:
        raise LoraError(f"the LoRA's PEFT settings (lora_adapter_metadata or adapter_config) are damaged: {problem}",
                        "download the LoRA again (its scale cannot be read)")
    return cfg


def _alpha_problem(cfg: dict) -> str | None:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not number(cfg["lora_alpha"]):
        return f"lora_alpha {str(cfg['lora_alpha'])[:20]!r} is not a number"
    pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and number(v) for k, v in pattern.items()):
        return "alpha_pattern is not a table of module names and numbers"
    for k in pattern:
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error:
            return f"alpha_pattern {k[:30]!r} is not a module pattern"
    if not isinstance(cfg.get("use_rslora", False), (bool, type(None))):
        return "use_rslora is not true or false"
    return None


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


def plan_lora(tensors: dict, student, model_shapes: dict, *, block_map: BlockMap | None = None,
              metadata: dict | None = None, adapter_config: dict | None = None,
              apply_uncertain: bool = False, model_prefix: str = "diffusion_model.") -> LoraPlan:
    """Map a LoRA's keys onto a loaded UNet.

    ``tensors``: the LoRA file ({key: tensor}; only ``.shape`` is read). ``student``: the model's
    :class:`Topology` (or its ComfyUI ldm unet_config). ``model_shapes``: {model state-dict key: shape}
    of the loaded model (keys start with ``model_prefix``). ``block_map``: how the student descends
    from its teacher (a student built by this pack carries its own); by default the published
    correspondence against the family's teacher (:func:`blockmap.derive`). Modules whose adapter tensors
    ComfyUI could not apply (:func:`adapter_problem`) are left out and listed as damaged.
    Raises :class:`LoraError` only when the PEFT scale settings the modules need cannot be read; the caller
    decides what an empty plan means.
    """
    student = as_topology(student)
    bm = block_map or derive(teacher_of(student), student)
    teacher = bm.teacher
    s_map = names.module_map(student)
    t_map = names.module_map(teacher)
    s_ldm = set(s_map.values())
    t_ldm = set(t_map.values())
    table = underscore_table([student, teacher])

    plan = LoraPlan()
    condconv = condconv_paths(model_shapes, model_prefix)
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
        problem = adapter_problem(prefix, tensors)
        if is_text_encoder(prefix):
            if problem:
                plan.damaged_text_encoder.append((prefix, problem))
            else:
                plan.text_encoder.append(prefix)
            continue
        pm = parse_prefix(prefix, table)
        if pm is None:
            plan.unknown.extend(prefix_keys[prefix])
            continue
        if problem:
            plan.damaged.append((prefix, problem))
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
        shape = tuple(model_shapes[key])
        if condconv.get(key[len(model_prefix):-len(".weight")]):
            shape = shape[1:]  # a CondConv layer: one expert's kernel
        return fits(prefix, tensors, shape)

    # reading 1: the names are the student's own
    def as_student(pm: ParsedModule):
        ldm = s_map.get(pm.path) if pm.layout == "diffusers" else (pm.path if pm.path in s_ldm else None)
        return target_ok(ldm)

    # reading 2: the names are the teacher's
    def as_teacher(pm: ParsedModule):
        ldm = t_map.get(pm.path) if pm.layout == "diffusers" else (pm.path if pm.path in t_ldm else None)
        if ldm is None:
            return UNKNOWN, None, "not a teacher module"
        s_module, certainty, why = bm.student_module(ldm)
        if s_module is None:
            return REMOVED, None, why
        key = target_ok(s_module)
        if key is None:
            return REMOVED, None, f"{s_module} does not exist in the student"
        return (MAPPED if certainty == CERTAIN else UNCERTAIN), key, why

    student_score = sum(1 for pm in parsed if (k := as_student(pm)) and shape_fits(pm.prefix, k))
    teacher_res = {pm.prefix: as_teacher(pm) for pm in parsed}
    def teacher_explains(pm: ParsedModule) -> bool:
        outcome, key, _ = teacher_res[pm.prefix]
        return outcome != UNKNOWN and (key is None or shape_fits(pm.prefix, key))

    teacher_score = sum(1 for pm in parsed if teacher_explains(pm))
    same_structure = _structure(student) == _structure(teacher)
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
        experts = condconv.get(key[len(model_prefix):-len(".weight")])
        if experts:
            plan.condconv.append((pm.prefix, f"{experts} experts at {key}"))
            continue
        if not shape_fits(pm.prefix, key):
            plan.shape_mismatch.append((pm.prefix, f"{implied_shape(pm.prefix, tensors)} vs "
                                                   f"{tuple(model_shapes[key])} at {key}"))
            continue
        plan.to_load[pm.prefix] = key

    # PEFT / new-diffusers files carry no .alpha: take it from the metadata or adapter config
    ranks = {prefix: rank for prefix in plan.to_load
             if prefix + ".alpha" not in tensors and (rank := _rank_of(prefix, tensors)) is not None}
    cfg = peft_alpha_config(metadata, adapter_config) if ranks else None
    if cfg:
        for prefix, rank in ranks.items():
            pm = parse_prefix(prefix, table)
            plan.extra_alpha[prefix] = _peft_alpha(pm.path if pm else prefix, cfg, rank)
    return plan


def _structure(t: Topology) -> tuple:
    return (t.num_res_blocks, t.levels, t.transformer_depth, t.transformer_depth_output, t.transformer_depth_middle)


def lora_context_dim(tensors: dict) -> int | None:
    """The cross-attention context width a LoRA was trained for (from attn2.to_k/to_v), if present."""
    for key, t in tensors.items():
        sp = split_key(key)
        if sp is None or is_text_encoder(sp[0]) or len(getattr(t, "shape", ())) < 2:
            continue
        p = sp[0].replace("_", ".")
        if re.search(r"attn2\.(processor\.)?to\.[kv]$", p):
            if sp[1] in (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight",
                         ".lora_A", ".lora_A.default.weight", ".lora_linear_layer.down.weight"):
                return int(t.shape[1])
    return None


def family_mismatch(tensors: dict, student) -> str | None:
    """A sentence when the LoRA was trained for another model family (context width differs)."""
    ctx = lora_context_dim(tensors)
    want = as_topology(student).context_dim
    if ctx is None or want is None or ctx == want:
        return None
    return (f"the LoRA was trained for {_family_name(ctx)} (cross-attention width {ctx}) but the model is "
            f"{_family_name(want)} (width {want})")


def _family_name(context_dim: int) -> str:
    fam = CONTEXT_FAMILY.get(context_dim)
    return FAMILY_NAMES[fam] if fam else f"context width {context_dim}"
