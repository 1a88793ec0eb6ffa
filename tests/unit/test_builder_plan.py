"""The student builder's plans at full size (host-free, meta device): exact published parameter counts, every
tensor sourced, and the pairing errors."""

from __future__ import annotations

import math

import pytest
import torch
from distilled_unets.models.errors import PackError
from distilled_unets.models.structure import registry
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.blockmap import BASE, NEW, TEACHER
from distilled_unets.models.structure.cost import unet_cost
from distilled_unets.models.structure.topology import diffusers_config
from distilled_unets.models.students import builder

from ..layouts import meta_shapes, to_ldm

COUNTERPARTS = [(p.name, fam, cid) for p in S.PRESETS.values() for fam, cid in p.counterparts.items()]


def ldm_shapes(t):
    cfg = diffusers_config(t)
    return to_ldm(meta_shapes(cfg), cfg, gapped=False)


@pytest.mark.parametrize("preset,family,counterpart", COUNTERPARTS, ids=[f"{p}-{f}" for p, f, _ in COUNTERPARTS])
def test_preset_has_the_published_parameter_count_and_every_tensor_from_the_teacher(preset, family, counterpart):
    p = builder.plan(preset, S.TEACHERS[family])
    entry = registry.by_id(counterpart)
    assert p.student.signature() == entry.structure.signature()
    want = ldm_shapes(p.student)
    assert sum(math.prod(s) for s in want.values()) == unet_cost(p.student).params == entry.params
    teacher = {k: torch.empty(s, device="meta") for k, s in ldm_shapes(p.teacher).items()}
    sd, origin = builder.student_state_dict(p, want, teacher)
    assert set(origin.values()) == {TEACHER} and sd.keys() == want.keys()
    assert all(s.certainty == "certain" for s in p.block_map.units.values())  # built here: known exactly


@pytest.mark.parametrize("preset,params,cost", [("asdm-m1", 848_791_044, 0.854), ("asdm-m2", 809_513_604, 0.756)])
def test_asdm_combinations(preset, params, cost):
    p = builder.plan(preset, S.SD1, S.BK_BASE)
    assert unet_cost(p.student).params == params
    assert unet_cost(p.student).macs / unet_cost(S.SD1).macs == pytest.approx(cost, abs=5e-4)
    want = ldm_shapes(p.student)
    teacher = {k: torch.empty(s, device="meta") for k, s in ldm_shapes(S.SD1).items()}
    base = {k: torch.empty(s, device="meta") for k, s in ldm_shapes(S.BK_BASE).items()}
    _, origin = builder.student_state_dict(p, want, teacher, base)
    assert {TEACHER, BASE} == set(origin.values())


def test_report_lists_moves_removals_and_choices():
    p = builder.plan("vega", S.SDXL)
    want = ldm_shapes(p.student)
    teacher = {k: torch.empty(s, device="meta") for k, s in ldm_shapes(S.SDXL).items()}
    _, origin = builder.student_state_dict(p, want, teacher)
    text = builder.build_report(p, origin, "my-xl.safetensors")
    assert "745,225,604 (29% of the teacher's 2,567,463,684)" in text
    assert "10 -> 2: teacher layers [0, 9]" in text and "a documented choice" in text
    assert "Removed teacher blocks" in text and "middle_block.1" in text and "Not distilled yet" in text


def test_new_tensors_are_initialised_explicitly():
    p = builder.plan("bk-base", S.SD1)
    want = {"input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3), "made.up.bias": (4,), "made.up.norm": (4,),
            "made.up.proj.weight": (4, 8)}
    teacher = {"input_blocks.1.0.in_layers.2.weight": torch.ones(320, 320, 3, 3)}
    sd, origin = builder.student_state_dict(p, want, teacher)
    assert origin["made.up.bias"] == NEW and torch.equal(sd["made.up.bias"], torch.zeros(4))
    assert torch.equal(sd["made.up.norm"], torch.ones(4))
    assert 0.1 < sd["made.up.proj.weight"].std() < 0.7
    with pytest.raises(ValueError, match="<- teacher"):
        builder.student_state_dict(p, {"input_blocks.1.0.in_layers.2.weight": (1, 2)}, teacher)


@pytest.mark.parametrize("args,input_name,match", [
    (("koala-1b", S.SD1), "preset", "for SDXL teachers"),
    (("bk-tiny", S.SDXL), "preset", "for SD 1.x / SD 2.x teachers"),
    (("asdm-m2", S.SD2), "base_student", "no base_student"),
    (("asdm-m1", S.SD1, S.BK_V2_BASE), "base_student", "base_student is SD 2.x"),
    (("asdm-m1", S.SD1, S.BK_SMALL), "base_student", "not BK-Base-structured"),
    (("bk-base", S.BK_BASE), "teacher", "not a full SD 1.x UNet"),
    (("nope", S.SD1), "preset", "unknown preset"),
])
def test_pairing_errors(args, input_name, match):
    with pytest.raises(PackError, match=match) as e:
        builder.plan(*args)
    assert e.value.input_name == input_name and e.value.node == "BuildStudentUNet" and e.value.fix


def test_teacher_hash_is_stable_and_sensitive():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.zeros(2, dtype=torch.float16)}
    h = builder.weights_sha256(a)
    assert h == builder.weights_sha256(dict(reversed(list(a.items()))))
    b = dict(a, x=a["x"].clone())
    b["x"][0, 0] = 1e-3
    assert builder.weights_sha256(b) != h and len(h) == 64
