"""Names, teachers, parameter counts and recommended settings, put on top of a detected structure.

The registry never decides whether a file loads: detection does. It only recognises a structure
(several public models share one: small-sd = BK-SDM-Base, tiny-sd = BK-SDM-Tiny, KOALA =
KOALA-Lightning) and says what it knows about it. Collisions between *different* structures that
ComfyUI confuses are broken by the structure itself: bk-sdm-v2-tiny and SDXS-512-0.9 differ only
in whether level-0 ``attn1`` is a cross-attention (``disable_self_attn``), which is part of the
signature here. Names in the file name or metadata pick one entry among identical structures.
"""

from __future__ import annotations

import re

from .cost import unet_cost
from .structures import MODELS, Model
from .topology import FAMILY_NAMES, Topology

DEFAULT_LATENT = {"sd1": (64, 64), "sd2": (64, 64), "sdxl": (128, 128)}

REGISTRY: tuple[Model, ...] = MODELS
TEACHERS = {e.family: e for e in REGISTRY if e.is_teacher}


def by_id(model_id: str) -> Model:
    for e in REGISTRY:
        if e.id == model_id:
            return e
    raise KeyError(model_id)


def matches(topology: Topology) -> list[Model]:
    """Every registry entry whose structure equals ``topology`` (empty for an unknown prune)."""
    sig = topology.signature()
    return [e for e in REGISTRY if e.structure.signature() == sig]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _short(e: Model) -> str:
    return e.id.split("/")[-1]


def identify(topology: Topology, hint: str = "") -> tuple[Model | None, list[Model]]:
    """The best entry for ``topology`` and all structurally identical ones.

    ``hint`` is the file or folder name (and any metadata text): when it names one of several
    structurally identical models (or one of its aliases), that one is chosen; otherwise the first
    released student is.
    """
    found = matches(topology)
    if not found:
        return None, []
    h = _norm(hint)
    named = []
    for e in found:
        for name in (_short(e), *e.aliases):
            if _norm(name) and _norm(name) in h:
                named.append((len(_norm(name)), e))
    if named:
        named.sort(key=lambda x: -x[0])  # "bk-sdm-tiny-2m" beats "bk-sdm-tiny"
        return named[0][1], found
    return found[0], found


def describe(topology: Topology, hint: str = "", params: int | None = None) -> dict:
    """Everything the loader reports about a detected UNet, as a dict (see :func:`info_text`)."""
    entry, same = identify(topology, hint)
    cost = unet_cost(topology, *DEFAULT_LATENT[topology.family])
    teacher = TEACHERS[topology.family]
    tcost = unet_cost(teacher.structure, *DEFAULT_LATENT[topology.family])
    return {
        "entry": entry,
        "same_structure": [e.id for e in same],
        "family": topology.family,
        "params": params if params is not None else cost.params,
        "teacher_params": tcost.params,
        "param_ratio": (params or cost.params) / tcost.params,
        "step_cost_ratio": cost.macs / tcost.macs,
        "latent": DEFAULT_LATENT[topology.family],
        "structure": topology.describe(),
    }


def info_text(d: dict, layout: str = "", prediction: str = "") -> str:
    """The human-readable summary the loader node outputs."""
    e: Model | None = d["entry"]
    fam = FAMILY_NAMES[d["family"]]
    lines = []
    if e is None:
        lines.append(f"Unknown {fam} structure (a custom or A-SDM-style prune) - loaded from its structure.")
        lines.append(f"Teacher family: {fam}")
    elif e.is_teacher:
        lines.append(f"Model: {e.id} (a full teacher UNet, not a distilled one)")
    else:
        others = [x for x in d["same_structure"] if x != e.id]
        lines.append(f"Model: {e.id}" + (f" (same structure as {', '.join(others)})" if others else ""))
        lines.append(f"Teacher: {e.teacher}")
        if e.url:
            lines.append(f"Source: {e.url}")
    r = d["param_ratio"]
    lines.append(f"UNet parameters: {d['params']:,} ({r:.0%} of the {fam} teacher's {d['teacher_params']:,})")
    h, w = d["latent"]
    lines.append(f"Estimated per-step cost: {d['step_cost_ratio']:.2f}x the teacher's at {h * 8}x{w * 8} px")
    lines.append(f"Structure: {d['structure']}")
    if layout:
        lines.append(f"File layout: {layout}" + (f"; prediction: {prediction}" if prediction else ""))
    rec = e.rec if e is not None else None
    if rec:
        rw, rh = rec.resolution
        lines.append(f"Recommended: {rec.sampler} / {rec.scheduler}, {rec.steps} steps, CFG {rec.cfg}, "
                     f"{rw}x{rh}" + (f" - {rec.note}" if rec.note else ""))
    return "\n".join(lines)
