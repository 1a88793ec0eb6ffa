"""Building a student UNet from a teacher the way the published recipes do it (host-free).

:func:`plan` checks the pairing (preset, teacher, A-SDM base student) and derives the student's
structure and its block map; :func:`student_state_dict` copies every student tensor from the teacher
(or the base student) by that map, exactly as BK-SDM's initialisation does, and initialises the tensors
no source maps to explicitly; :func:`build_report` says what came from where.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import IncompatibleModelsError
from ..structure import names
from ..structure.blockmap import BASE, NEW, TEACHER, BlockMap, derive
from ..structure.cost import unet_cost
from ..structure.registry import DEFAULT_LATENT
from ..structure.structures import KEPT_LAYERS, PRESETS, TEACHERS, Preset, bk, spread_layers
from ..structure.topology import FAMILY_NAMES, Topology

NODE = "BuildStudentUNet"
NOT_DISTILLED = ("Not distilled yet: an undistilled student makes poor images. Distil it (DistillStudentUNet) "
                 "before using it for generation.")


class PairingError(IncompatibleModelsError):
    """A preset, teacher and base student that do not go together."""


@dataclass
class Plan:
    preset: Preset
    teacher: Topology
    student: Topology
    block_map: BlockMap
    layer_note: str = ""


def _structure(t: Topology) -> tuple:
    return (t.channel_mult, t.num_res_blocks, t.transformer_depth, t.transformer_depth_output,
            t.transformer_depth_middle, t.disable_self_attn)


def _same_width(a: Topology, b: Topology) -> bool:
    return (a.model_channels, a.context_dim, a.use_linear, a.adm_in_channels) == \
        (b.model_channels, b.context_dim, b.use_linear, b.adm_in_channels)


def plan(preset_name: str, teacher: Topology, base: Topology | None = None, *, node: str = NODE) -> Plan:
    """The student of ``teacher`` under ``preset_name`` (typed errors naming the input and the fix)."""
    preset = PRESETS.get(preset_name)
    if preset is None:
        raise PairingError(f"unknown preset {preset_name!r}", f"pick one of {', '.join(PRESETS)}", node=node,
                           input_name="preset")
    fam = teacher.family
    if fam not in TEACHERS:
        raise PairingError("the teacher is not an SD 1.x, SD 2.x or SDXL UNet",
                           "connect the MODEL of an SD 1.5, SD 2.x or SDXL checkpoint (fine-tunes work)", node=node,
                           input_name="teacher")
    if _structure(teacher) != _structure(TEACHERS[fam]):
        raise PairingError(f"the teacher is not a full {FAMILY_NAMES[fam]} UNet (it has {teacher.describe()})",
                           "connect the full teacher checkpoint (a fine-tune of SD 1.5 / SD 2.x / SDXL), not a "
                           "distilled student", node=node, input_name="teacher")
    if fam not in preset.families:
        fits = [p for p, x in PRESETS.items() if fam in x.families]
        raise PairingError(f"preset {preset_name} is for {' / '.join(FAMILY_NAMES[f] for f in preset.families)} "
                           f"teachers, but the teacher is {FAMILY_NAMES[fam]}",
                           f"for this teacher pick one of {', '.join(fits)}", node=node, input_name="preset")
    if preset.needs_base:
        want = bk(teacher, "base")
        if base is None:
            raise PairingError(f"preset {preset_name} combines a distilled BK-Base-structured student with the "
                               "teacher, and no base_student is connected",
                               f"connect a BK-Base-structured {FAMILY_NAMES[fam]} student (bk-sdm-base, small-sd, or "
                               "a bk-base student built and distilled here) to base_student", node=node,
                               input_name="base_student")
        if base.family != fam or not _same_width(base, teacher):
            raise PairingError(f"base_student is {FAMILY_NAMES.get(base.family, base.family)} "
                               f"({base.model_channels} channels) but the teacher is {FAMILY_NAMES[fam]} "
                               f"({teacher.model_channels} channels)",
                               f"connect a BK-Base-structured student of the same family ({FAMILY_NAMES[fam]})",
                               node=node, input_name="base_student")
        if _structure(base) != _structure(want):
            raise PairingError(f"base_student is not BK-Base-structured ({base.describe()})",
                               "connect bk-sdm-base / small-sd (or a bk-base student built here): A-SDM combines the "
                               "blocks of that structure", node=node, input_name="base_student")
    student = preset.make(teacher, base)
    chosen = KEPT_LAYERS.get(preset.name, {})
    used: dict[tuple[int, int], tuple[int, ...]] = {}

    def choose(n_teacher: int, n_student: int) -> tuple[int, ...]:
        layers = chosen.get((n_teacher, n_student)) or spread_layers(n_teacher, n_student)
        used[(n_teacher, n_student)] = layers
        return layers

    note = ("which teacher layers the published model kept is not published; this build keeps "
            + ("the third-party estimate for SSD-1B where it has one, else " if chosen else "")
            + "layers spread evenly from the first to the last")
    bm = derive(teacher, student, built=True, layer_choice=choose, base=base if preset.needs_base else None,
                base_levels=preset.asdm_levels, choice_note=note)
    layer_note = ""
    if used:
        layer_note = "Kept transformer layers (a documented choice, " + note + "): " + "; ".join(
            f"{a} -> {b}: teacher layers {list(v)}" for (a, b), v in sorted(used.items(), reverse=True))
    return Plan(preset, teacher, student, bm, layer_note)


def init_new(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The explicit initialisation of a tensor no source maps to: norms 1/0, biases 0, weights
    N(0, 1/fan_in) (ComfyUI's ops leave weights uninitialised, so nothing else would set them)."""
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def student_state_dict(p: Plan, want: dict, teacher_sd: dict, base_sd: dict | None = None, *,
                       seed: int = 0) -> tuple[dict, dict]:
    """(student state dict, {key: origin}) for the student keys and shapes in ``want`` (ldm names, no prefix).

    Every tensor is copied (cloned) from its source by the block map; a key with no source is initialised
    by :func:`init_new`. Raises ``ValueError`` when a source tensor is missing or shaped otherwise (a bug)."""
    g = torch.Generator().manual_seed(seed)
    sources = {TEACHER: teacher_sd, BASE: base_sd or {}}
    out, origin = {}, {}
    for key, shape in want.items():
        src = p.block_map.source_key(key)
        if src is None:
            out[key] = init_new(key, tuple(shape), g)
            origin[key] = NEW
            continue
        which, skey = src
        t = sources[which].get(skey)
        if t is None or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key} <- {which} {skey}: {None if t is None else tuple(t.shape)} vs {tuple(shape)}")
        out[key] = t.detach().clone()
        origin[key] = which
    return out, origin


#: the 3x3 convolutions of a resnet unit (ldm names): conv1, conv2
RESNET_CONVS = ("in_layers.2", "out_layers.3")


def condconv_sources(p: Plan, teacher_shapes: dict, student_shapes: dict, level: int = 0) -> dict[str, list[str]]:
    """A-SDM's CLME-CondConv plan: {student conv (ldm module path): [teacher convs that become its extra experts]}
    for the 3x3 convolutions of the student's resnets in the down and up stage of ``level`` (0 = the shallowest).

    "Cross-layer": the extra experts are the same convolution (conv1 / conv2) of the teacher's resnets of that
    stage that the student lost (merged away), nearest position first, where the shapes fit; A-SDM collects the
    teacher's 3x3 kernels of the stage's layers for the student's layers of it. Shapes are ``{key: shape}``
    without the ``diffusion_model.`` prefix."""
    t_units = [u for u in names.units(p.teacher) if u.kind == "resnet" and u.level == level]
    kept = {s.teacher for s in p.block_map.units.values() if s.teacher}
    out: dict[str, list[str]] = {}
    for u in names.units(p.student):
        if u.kind != "resnet" or u.level != level or u.side not in ("in", "out"):
            continue
        src = p.block_map.units[u.ldm]
        here = next((t for t in t_units if t.ldm == src.teacher), None)
        merged = [t for t in t_units if t.side == u.side and t.ldm not in kept]
        merged.sort(key=lambda t: abs(t.index - (here.index if here else u.index)))
        for conv in RESNET_CONVS:
            path = f"{u.ldm}.{conv}"
            want = tuple(student_shapes[f"{path}.weight"])
            out[path] = [f"{t.ldm}.{conv}" for t in merged if tuple(teacher_shapes.get(f"{t.ldm}.{conv}.weight", ()))
                         == want]
    return out


def weights_sha256(sd: dict) -> str:
    """sha256 of a state dict's names and tensor bytes, in name order (identifies the teacher in saved files)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_report(p: Plan, origin: dict, teacher_name: str = "") -> str:
    """The builder node's info: size and cost against the teacher, where every tensor came from."""
    fam = FAMILY_NAMES[p.teacher.family]
    lat = DEFAULT_LATENT[p.teacher.family]
    sc, tc = unet_cost(p.student, *lat), unet_cost(p.teacher, *lat)
    n = len(origin)
    by = {o: sum(1 for v in origin.values() if v == o) for o in (TEACHER, BASE, NEW)}
    counterpart = p.preset.counterparts.get(p.teacher.family)
    lines = [f"Student: preset {p.preset.name} of the {fam} teacher{' ' + teacher_name if teacher_name else ''} "
             f"({p.preset.source})" + (f"; same structure as {counterpart}" if counterpart else ""),
             f"Parameters: {sc.params:,} ({sc.params / tc.params:.0%} of the teacher's {tc.params:,})",
             f"Estimated per-step cost: {sc.macs / tc.macs:.2f}x the teacher's at {lat[0] * 8}x{lat[1] * 8} px",
             f"Tensors: {by[TEACHER]} of {n} from the teacher ({by[TEACHER] / n:.0%})"
             + (f", {by[BASE]} from the base student" if by[BASE] else "") + f", {by[NEW]} new"
             + (" (initialised: norms 1, biases 0, weights N(0, 1/fan_in))" if by[NEW] else "")]
    t_units = names.unit_index(p.teacher)
    moved, in_place = [], 0
    for u in names.units(p.student):
        src = p.block_map.units[u.ldm]
        if src.origin == TEACHER and src.unit == u.ldm and src.layers in (None, tuple(range(t_units[u.ldm].depth))):
            in_place += 1
            continue
        where = "base student" if src.origin == BASE else src.origin
        layers = f" layers {list(src.layers)}" if src.layers and src.origin != NEW and src.layers != tuple(
            range(len(src.layers))) else ""
        moved.append(f"{u.ldm} <- {where} {src.unit or ''}{layers}".rstrip())
    kept = {s.teacher for s in p.block_map.units.values() if s.teacher}
    removed = [u.ldm for u in names.units(p.teacher) if u.ldm not in kept]
    lines.append(f"Blocks: {in_place} teacher blocks kept in place; {len(moved)} moved or combined"
                 + (": " + "; ".join(moved) if moved else ""))
    lines.append(f"Removed teacher blocks ({len(removed)}): " + ", ".join(removed))
    if p.layer_note:
        lines.append(p.layer_note)
    lines.append(NOT_DISTILLED)
    return "\n".join(lines)
