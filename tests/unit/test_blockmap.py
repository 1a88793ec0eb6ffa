"""Teacher -> student block correspondence (models/structure/blockmap.py), checked against the published BK-SDM rule
written out independently in tests/_lora_fixtures.expected_bk."""

from __future__ import annotations

import pytest
from distilled_unets.models.structure import names
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.blockmap import BASE, CERTAIN, NEW, TEACHER, UNSURE, BlockMap, derive

from .._lora_fixtures import expected_bk


@pytest.mark.parametrize("student", [S.BK_BASE, S.BK_SMALL, S.BK_TINY], ids=["base", "small", "tiny"])
def test_bk_rule_for_every_teacher_module(student):
    bm = derive(S.SD1, student)
    t_map, s_map = names.module_map(S.SD1), names.module_map(student)
    for t_diff, t_ldm in t_map.items():
        want = expected_bk(t_diff, student)
        got, certainty, _ = bm.student_module(t_ldm)
        assert got == (s_map[want] if want else None), t_diff
        if got:
            assert certainty == CERTAIN
    # every student tensor comes from the teacher, certainly
    assert {s.origin for s in bm.units.values()} == {TEACHER}
    assert {s.certainty for s in bm.units.values()} == {CERTAIN}


def test_tiny_shifts_up_blocks_and_sources_keys():
    bm = derive(S.SD1, S.BK_TINY)
    # student up_blocks.0 (level 2) pair 1 <- teacher up_blocks.1 pair 2
    key = "output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert bm.source_key(key) == (TEACHER, "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight")
    key = "diffusion_model.input_blocks.0.0.weight"
    assert bm.source_key(key) == (TEACHER, key)


def test_exact_marks_the_seams_of_the_removal():
    bm = derive(S.SD1, S.BK_BASE)
    exact = {u for u, s in bm.units.items() if s.exact}
    assert "input_blocks.1.0" in exact and "input_blocks.1.1" in exact  # level 0 pair 0: untouched
    assert "input_blocks.2.0.op" not in exact  # the downsampler now reads pair 0 instead of pair 1
    assert "output_blocks.1.0" not in exact  # up pair 1 <- teacher pair 2: moved
    assert set(bm.trainable_units("changed blocks only")) == set(bm.units) - exact
    assert bm.trainable_units("student blocks only") == []
    assert set(bm.trainable_units("all")) == set(bm.units)
    same = derive(S.SD1, S.SD1)
    assert all(s.exact for s in same.units.values())


def test_sdxl_students_published_vs_built():
    pub = derive(S.SDXL, S.SSD_1B)
    u = pub.units["input_blocks.7.1"]  # level 2, depth 10 -> 4
    assert u.certainty == UNSURE and u.layers == (0, 1, 2, 3) and "not published" in u.note
    assert pub.units["output_blocks.2.1"].certainty == CERTAIN  # up_blocks.0.attentions.2 keeps 10 layers
    choice = S.KEPT_LAYERS["ssd-1b"]
    built = derive(S.SDXL, S.SSD_1B, built=True, layer_choice=lambda a, b: choice.get((a, b), S.spread_layers(a, b)),
                   choice_note="documented choice")
    u = built.units["input_blocks.7.1"]
    assert u.certainty == CERTAIN and u.layers == (0, 1, 2, 6)
    assert built.source_key("input_blocks.7.1.transformer_blocks.3.attn1.to_q.weight")[1] == \
        "input_blocks.7.1.transformer_blocks.6.attn1.to_q.weight"
    assert built.student_module("input_blocks.7.1.transformer_blocks.6.ff.net.2")[0] == \
        "input_blocks.7.1.transformer_blocks.3.ff.net.2"
    assert built.student_module("input_blocks.7.1.transformer_blocks.5.ff.net.2")[0] is None
    koala = derive(S.SDXL, S.KOALA_700M)
    assert koala.units["input_blocks.1.0"].certainty == UNSURE  # 2 -> 1 pairs: not published for KOALA
    assert S.spread_layers(10, 5) == (0, 2, 4, 7, 9) and S.spread_layers(10, 2) == (0, 9)


def test_asdm_combination_lineage():
    m2 = S.PRESETS["asdm-m2"].make(S.SD1, S.BK_BASE)
    bm = derive(S.SD1, m2, built=True, base=S.BK_BASE, base_levels=(0, 1))
    counts = bm.counts()
    assert counts[BASE] > 0 and counts[TEACHER] > 0 and counts.get(NEW, 0) == 0
    # level 1 down pair 0 comes from the base student; level 2 from the teacher
    assert (bm.units["input_blocks.3.0"].origin, bm.units["input_blocks.3.0"].unit) == (BASE, "input_blocks.3.0")
    assert bm.units["input_blocks.3.0"].teacher == "input_blocks.4.0"
    assert (bm.units["input_blocks.5.0"].origin, bm.units["input_blocks.5.0"].unit) == (TEACHER, "input_blocks.7.0")
    # lineage: the base's up pair 1 of level 0 descends from the teacher's pair 2
    last = names.units(m2)[-3]
    assert last.side == "out" and last.level == 0
    assert bm.units[last.ldm].teacher == "output_blocks.11.1"
    assert set(bm.trainable_units("student blocks only")) == {u for u, s in bm.units.items() if s.origin == BASE}


def test_json_round_trip():
    built = derive(S.SDXL, S.VEGA, built=True, layer_choice=S.spread_layers)
    back = BlockMap.from_json(built.to_json())
    assert back.units == built.units and back.student == built.student and back.teacher == built.teacher
    with pytest.raises(ValueError):
        BlockMap.from_json('{"format": 99}')
    with pytest.raises(ValueError):
        BlockMap.from_json("not json")
