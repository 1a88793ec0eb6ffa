"""Teacher -> student block correspondence, as data derived from the two structures.

For every unit of a student (``names.Unit``: resnet, attention, sampler, stem) a :class:`UnitSource`
says where its weights come from (the teacher, an A-SDM base student, or nowhere: new), which
transformer layers of the source it holds, how sure that is, and which teacher unit it descends
from. The same map serves

* the LoRA mapper: a LoRA trained on the teacher lands on the student unit that descends from the
  unit it was trained for (:meth:`BlockMap.student_module`);
* the student builder: each student tensor is copied from :meth:`BlockMap.source_key`;
* the distiller: "changed blocks only" trains the units that are not :attr:`UnitSource.exact`, "student
  blocks only" the units whose origin is not the teacher.

Rules (published ones are *certain*):

* Levels pair by depth from the shallowest; a student with fewer levels lost its deepest ones (BK-Tiny).
* Inside a level's down stage the student keeps the teacher's first pairs; inside an up stage the first
  ones and the last (BK-SDM: up pair 1 <- teacher pair 2). Certain for SD1.x/2.x with two teacher pairs
  and one student pair (BK-SDM, segmind); unsure otherwise (KOALA does not publish it).
* An attention with fewer transformer layers than its source keeps the first ones (unsure: SSD-1B, Vega
  and KOALA publish no choice), unless the student was built here, where the builder's choice is recorded
  and therefore certain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from . import names
from .topology import Topology, from_comfy_config, whole
from .topology import problem as topology_problem

CERTAIN, UNSURE, NEW = "certain", "unsure", "new"
TEACHER, BASE = "teacher", "base"
ORIGINS = (TEACHER, BASE, NEW)
FORMAT = 1


@dataclass(frozen=True)
class UnitSource:
    origin: str                               # "teacher" | "base" | "new"
    unit: str | None                          # unit prefix in the origin model (None when new)
    layers: tuple[int, ...] | None = None     # attention: the origin's transformer block of each student block
    certainty: str = CERTAIN                  # "certain" | "unsure" | "new"
    exact: bool = False                       # same unit, same place, same inputs and internals as in the teacher
    teacher: str | None = None                # the teacher unit this one descends from (lineage)
    teacher_layers: tuple[int, ...] | None = None
    note: str = ""                            # why unsure, or which documented choice was made


@dataclass
class BlockMap:
    teacher: Topology
    student: Topology
    units: dict[str, UnitSource] = field(default_factory=dict)  # student unit prefix -> source
    base: Topology | None = None

    # -- lookups ------------------------------------------------------------------------------
    def unit_of(self, key: str) -> str | None:
        """The student unit prefix of an ldm state-dict key or module path (``diffusion_model.`` stripped)."""
        if key.startswith("diffusion_model."):
            key = key[len("diffusion_model."):]
        u = names.unit_of(key, self.student)
        return u.ldm if u is not None else None

    def source_key(self, key: str) -> tuple[str, str] | None:
        """(origin, key in the origin model) for one student tensor, or None when it is new. A
        ``diffusion_model.`` prefix is kept."""
        pre = "diffusion_model." if key.startswith("diffusion_model.") else ""
        unit = self.unit_of(key)
        src = self.units.get(unit) if unit else None
        if src is None or src.origin == NEW or src.unit is None:
            return None
        return src.origin, pre + _move(key[len(pre):], unit, src.unit, src.layers)

    def student_module(self, teacher_module: str) -> tuple[str | None, str, str]:
        """(student module or None, certainty, why) for a module (ldm path) of the teacher."""
        tu = names.unit_of(teacher_module, self.teacher)
        if tu is None:
            return None, NEW, "not a module of the teacher"
        for s_unit, src in self.units.items():
            if src.teacher != tu.ldm:
                continue
            rest = teacher_module[len(tu.ldm):]
            if rest.startswith(".transformer_blocks."):
                t = int(rest.split(".")[2])
                layers = src.teacher_layers or ()
                if t not in layers:
                    return None, NEW, f"transformer block {t} of {tu.ldm} was removed (the student keeps {len(layers)})"
                rest = f".transformer_blocks.{layers.index(t)}." + rest.split(".", 3)[3]
            return s_unit + rest, src.certainty, src.note
        return None, NEW, f"{tu.diffusers} ({tu.ldm}) was removed in the student"

    def trainable_units(self, mode: str) -> list[str]:
        """Student units that train in a distillation mode: 'all', 'student blocks only', 'changed blocks only'."""
        if mode == "student blocks only":
            return [u for u, s in self.units.items() if s.origin != TEACHER]
        if mode == "changed blocks only":
            return [u for u, s in self.units.items() if not s.exact]
        return list(self.units)

    def counts(self) -> dict[str, int]:
        """How many student tensors come from each origin and certainty (for reports)."""
        out: dict[str, int] = {}
        for u in names.units(self.student):
            src = self.units[u.ldm]
            n = sum(1 for _ in u.modules)
            out[src.origin] = out.get(src.origin, 0) + n
            out[src.certainty] = out.get(src.certainty, 0) + n
        return out

    # -- files ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        units = {k: {f: (list(v) if isinstance(v, tuple) else v) for f, v in asdict(s).items()}
                 for k, s in self.units.items()}
        return json.dumps({"format": FORMAT, "teacher": self.teacher.comfy_unet_config(),
                           "student": self.student.comfy_unet_config(),
                           "base": self.base.comfy_unet_config() if self.base else None, "units": units},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, student: Topology | None = None) -> "BlockMap":
        """Read a block map back; raises ValueError when it is not one this version understands (any JSON, of any
        type, gives a block map or that error), or, with ``student``, when it describes another structure."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"not a block map (unreadable JSON: {type(e).__name__})") from e
        if not isinstance(d, dict):
            raise ValueError(f"not a block map (a JSON {type(d).__name__}, not an object)")
        if d.get("format") != FORMAT:
            raise ValueError(f"block map format {str(d.get('format'))[:20]} (this pack reads {FORMAT})")
        tops = {}
        for name in ("teacher", "student", "base"):
            if name == "base" and not d.get("base"):
                tops[name] = None
                continue
            try:
                tops[name] = from_comfy_config(d[name])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"not a block map (its {name} structure: {type(e).__name__})") from e
            why = topology_problem(tops[name])
            if why:
                raise ValueError(f"not a block map (its {name} structure: {why})")
        if student is not None and tops["student"].signature() != student.signature():
            raise ValueError("it describes another structure")
        raw = d.get("units")
        if not isinstance(raw, dict):
            raise ValueError("not a block map (no table of units)")
        units = {k: _unit_source(k, s) for k, s in raw.items()}
        bm = cls(tops["teacher"], tops["student"], units, tops["base"])
        bm._check_units()
        return bm

    def _check_units(self) -> None:
        """Every student unit has a source, and every source names units and transformer layers that exist."""
        s_units = names.unit_index(self.student)
        if set(self.units) != set(s_units):
            raise ValueError("the block map does not cover the student's units")
        origins = {TEACHER: names.unit_index(self.teacher),
                   BASE: names.unit_index(self.base) if self.base is not None else {}}

        def fits(layers, depth: int | None, of: int) -> bool:
            return layers is None or ((depth is None or len(layers) == depth) and all(x < of for x in layers))

        for k, src in self.units.items():
            have = origins[src.origin].get(src.unit) if src.origin != NEW else None
            teacher = origins[TEACHER].get(src.teacher) if src.teacher is not None else None
            if (src.origin != NEW and have is None) or (src.teacher is not None and teacher is None):
                raise ValueError(f"unit {k} comes from a unit its {src.origin} does not have")
            if not fits(src.layers, s_units[k].depth, have.depth if have else 0) or \
                    not fits(src.teacher_layers, None, teacher.depth if teacher else 0):
                raise ValueError(f"unit {k} names transformer layers its source does not have")


def _unit_source(key: str, s) -> UnitSource:
    """One unit's source read back, each field checked for its type."""
    def count_list(v) -> bool:
        return isinstance(v, list) and all(whole(x) for x in v)

    ok = isinstance(s, dict) and set(s) <= {f.name for f in fields(UnitSource)} and "origin" in s and "unit" in s
    ok = ok and s["origin"] in ORIGINS and (s["unit"] is None) == (s["origin"] == NEW) and \
        isinstance(s["unit"], (str, type(None))) and isinstance(s.get("teacher"), (str, type(None))) and \
        all(s.get(f) is None or count_list(s[f]) for f in ("layers", "teacher_layers")) and \
        s.get("certainty", CERTAIN) in (CERTAIN, UNSURE, NEW) and isinstance(s.get("exact", False), bool) and \
        isinstance(s.get("note", ""), str)
    if not ok:
        raise ValueError(f"not a block map (the source of unit {str(key)[:40]} is malformed)")
    s = dict(s)
    for f in ("layers", "teacher_layers"):
        s[f] = tuple(s[f]) if s.get(f) is not None else None
    return UnitSource(**s)


def _move(key: str, unit: str, to_unit: str, layers: tuple[int, ...] | None) -> str:
    rest = key[len(unit):]
    if layers is not None and rest.startswith(".transformer_blocks."):
        _, _, idx, tail = rest.split(".", 3)
        rest = f".transformer_blocks.{layers[int(idx)]}.{tail}"
    return to_unit + rest


# ------------------------------------------------------------------------------------------------
# derivation


def _by_position(t: Topology) -> dict[tuple, names.Unit]:
    return {(u.kind, u.side, u.level, u.index) if u.kind != "stem" else ("stem", u.ldm): u for u in names.units(t)}


def _inputs(t: Topology) -> dict[str, tuple[str, ...]]:
    """For each unit, the units whose outputs it reads (the previous unit; for an up resnet also its skip)."""
    out: dict[str, tuple[str, ...]] = {}
    skips: list[str] = []
    prev = None
    for u in names.units(t):
        if u.kind == "stem":
            if u.ldm == "input_blocks.0.0":
                skips.append(u.ldm)
                prev = u.ldm
            continue
        if u.side == "out" and u.kind == "resnet":
            out[u.ldm] = (prev, skips.pop())
        else:
            out[u.ldm] = (prev,)
        if u.side == "in" and (u.kind == "downsample" or u.kind == "attention" or not _has_attention_after(t, u)):
            skips.append(u.ldm)
        prev = u.ldm
    return out


def _has_attention_after(t: Topology, u: names.Unit) -> bool:
    return f"{u.ldm[:-2]}.1" in names.unit_index(t)


def _pair_index(side: str, j: int, nt: int, ns: int) -> int | None:
    """The teacher pair a student pair ``j`` comes from, in a stage of ``nt`` teacher and ``ns`` student pairs."""
    ct, cs = (nt, ns) if side == "in" else (nt + 1, ns + 1)
    if cs == ct:
        return j
    if cs > ct:
        return j if j < ct else None
    if side == "in":
        return j
    return j if j < cs - 1 else ct - 1


LayerChoice = Callable[[int, int], tuple[int, ...]]


def derive(teacher: Topology, student: Topology, *, built: bool = False, layer_choice: LayerChoice | None = None,
           base: Topology | None = None, base_levels: tuple[int, ...] = (), choice_note: str = "") -> BlockMap:
    """The block map of ``student`` against ``teacher``.

    ``built``: the student was (or is being) built here from the teacher, so every correspondence is
    what was copied (certain); ``layer_choice(n_teacher, n_student)`` picks the kept transformer layers
    (default: the first ones) and ``choice_note`` says what that choice was. ``base``/``base_levels``:
    A-SDM's combination, whose ``base_levels`` come from the ``base`` student (itself derived from the teacher).
    """
    t_pos = _by_position(teacher)
    b_map = derive(teacher, base) if base is not None else None
    b_pos = _by_position(base) if base is not None else {}
    family_rule = teacher.family in ("sd1", "sd2")
    t_nrb, s_nrb = teacher.num_res_blocks, student.num_res_blocks
    units: dict[str, UnitSource] = {}
    for u in names.units(student):
        key = (u.kind, u.side, u.level, u.index) if u.kind != "stem" else ("stem", u.ldm)
        if base is not None and u.level in base_levels and u.side in ("in", "out"):
            bu = b_pos.get(key)
            if bu is None or (bu.depth != u.depth):
                units[u.ldm] = UnitSource(NEW, None, certainty=NEW, note="no unit of the base student fits")
                continue
            lin = b_map.units[bu.ldm]
            layers = tuple(range(u.depth)) if u.kind == "attention" else None
            units[u.ldm] = UnitSource(BASE, bu.ldm, layers, CERTAIN if built else lin.certainty, False,
                                      lin.teacher, lin.teacher_layers, "from the base student")
            continue
        tkey, why = key, ""
        certainty = CERTAIN
        if u.level is not None and u.level >= teacher.levels:
            units[u.ldm] = UnitSource(NEW, None, certainty=NEW, note="the teacher has no such level")
            continue
        if u.kind in ("resnet", "attention") and u.side in ("in", "out"):
            nt, ns = t_nrb[u.level], s_nrb[u.level]
            tj = _pair_index(u.side, u.index, nt, ns)
            tkey = (u.kind, u.side, u.level, tj)
            if nt != ns and not built and not (family_rule and nt == 2 and ns == 1):
                certainty, why = UNSURE, "which teacher block pair the student kept is not published"
        elif u.kind == "resnet" and u.side == "mid":
            tkey = (u.kind, u.side, None, u.index)
        tu = t_pos.get(tkey)
        if tu is None or (u.kind == "resnet" and tu.shortcut != u.shortcut):
            units[u.ldm] = UnitSource(NEW, None, certainty=NEW, note="no teacher unit fits")
            continue
        layers = None
        if u.kind == "attention":
            if u.depth == tu.depth:
                layers = tuple(range(u.depth))
            elif u.depth > tu.depth:
                units[u.ldm] = UnitSource(NEW, None, certainty=NEW, note="deeper than its teacher unit")
                continue
            elif built:
                layers = (layer_choice or _first)(tu.depth, u.depth)
                why = why or choice_note or f"kept teacher layers {list(layers)} of {tu.depth}"
            else:
                layers = _first(tu.depth, u.depth)
                certainty, why = UNSURE, (f"depth {tu.depth} -> {u.depth}: which teacher transformer blocks were "
                                          "kept is not published")
        units[u.ldm] = UnitSource(TEACHER, tu.ldm, layers, certainty, False, tu.ldm, layers, why)
    bm = BlockMap(teacher, student, units, base)
    _mark_exact(bm)
    return bm


def _first(n_teacher: int, n_student: int) -> tuple[int, ...]:
    return tuple(range(n_student))


def _mark_exact(bm: BlockMap) -> None:
    t_units, s_units = names.unit_index(bm.teacher), names.unit_index(bm.student)
    t_in, s_in = _inputs(bm.teacher), _inputs(bm.student)
    for ldm, src in list(bm.units.items()):
        if src.origin != TEACHER:
            continue
        su, tu = s_units[ldm], t_units[src.unit]
        same_place = (su.kind, su.side, su.level, su.index) == (tu.kind, tu.side, tu.level, tu.index)
        same_inside = src.layers in (None, tuple(range(tu.depth)))
        fed_alike = len(s_in.get(ldm, ())) == len(t_in.get(src.unit, ())) and all(
            (bm.units[p].unit if p in bm.units and bm.units[p].origin == TEACHER else None) == q
            for p, q in zip(s_in.get(ldm, ()), t_in.get(src.unit, ())))
        if same_place and same_inside and fed_alike:
            bm.units[ldm] = UnitSource(**{**asdict(src), "exact": True})
