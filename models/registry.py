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
from dataclasses import dataclass

from ._registry_data import ENTRIES
from .cost import unet_cost
from .topology import Topology, from_comfy_config

DEFAULT_LATENT = {"sd1": (64, 64), "sd2": (64, 64), "sdxl": (128, 128)}


@dataclass(frozen=True)
class Entry:
    id: str
    family: str
    teacher: str | None
    is_teacher: bool
    params: int | None
    topology: Topology | None
    diffusers: dict | None
    where: str | None
    rec: dict
    status: str | None = None

    @property
    def short(self) -> str:
        return self.id.split("/")[-1]


def _load() -> list[Entry]:
    out = []
    for e in ENTRIES:
        topo = from_comfy_config(e["ldm"], e["family"]) if e.get("ldm") else None
        out.append(Entry(id=e["id"], family=e["family"], teacher=e.get("teacher"), is_teacher=e["is_teacher"],
                         params=e.get("params"), topology=topo, diffusers=e.get("diffusers"), where=e.get("where"),
                         rec=e["rec"], status=e.get("status")))
    return out


REGISTRY: list[Entry] = _load()
TEACHERS = {e.family: e for e in REGISTRY if e.is_teacher}


def by_id(model_id: str) -> Entry:
    for e in REGISTRY:
        if e.id == model_id:
            return e
    raise KeyError(model_id)


def matches(topology: Topology) -> list[Entry]:
    """Every registry entry whose structure equals ``topology`` (empty for an unknown prune)."""
    sig = topology.signature()
    return [e for e in REGISTRY if e.topology is not None and e.topology.signature() == sig]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def identify(topology: Topology, hint: str = "") -> tuple[Entry | None, list[Entry]]:
    """The best entry for ``topology`` and all structurally identical ones.

    ``hint`` is the file or folder name (and any metadata text): when it names one of several
    structurally identical models, that one is chosen; otherwise the first released student is.
    """
    found = matches(topology)
    if not found:
        return None, []
    h = _norm(hint)
    named = [e for e in found if _norm(e.short) and _norm(e.short) in h]
    if named:
        named.sort(key=lambda e: -len(e.short))  # "bk-sdm-tiny-2m" beats "bk-sdm-tiny"
        return named[0], found
    return found[0], found


def describe(topology: Topology, hint: str = "", params: int | None = None) -> dict:
    """Everything the loader reports about a detected UNet, as a dict (see :func:`info_text`)."""
    entry, same = identify(topology, hint)
    cost = unet_cost(topology, *DEFAULT_LATENT[topology.family])
    teacher = TEACHERS[topology.family]
    tcost = unet_cost(teacher.topology, *DEFAULT_LATENT[topology.family])
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
    e: Entry | None = d["entry"]
    fam = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[d["family"]]
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
    r = d["param_ratio"]
    lines.append(f"UNet parameters: {d['params']:,} ({r:.0%} of the {fam} teacher's {d['teacher_params']:,})")
    h, w = d["latent"]
    lines.append(f"Estimated per-step cost: {d['step_cost_ratio']:.2f}x the teacher's at {h * 8}x{w * 8} px")
    lines.append(f"Structure: {d['structure']}")
    if layout:
        lines.append(f"File layout: {layout}" + (f"; prediction: {prediction}" if prediction else ""))
    rec = e.rec if e is not None else None
    if rec:
        rw, rh = rec["resolution"]
        lines.append(f"Recommended: {rec['sampler']} / {rec['scheduler']}, {rec['steps']} steps, CFG {rec['cfg']}, "
                     f"{rw}x{rh}" + (f" - {rec['note']}" if rec.get("note") else ""))
    return "\n".join(lines)
