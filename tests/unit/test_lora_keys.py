"""Key normaliser and teacher->student mapping (host-free; shapes are uniform stand-ins here, the real
shapes and the patched weights are checked in tests/comfy/test_lora_node.py)."""

from __future__ import annotations

import pytest
import torch
from distilled_unets.models.patches import lora_keys as lk
from distilled_unets.models.structure import names
from distilled_unets.models.structure import structures as S

from .._lora_fixtures import FORMATS, LDM_FORMATS, expected_bk, lora_for

SD1_TEACHER, BK_BASE, BK_SMALL, BK_TINY, SSD1B = S.SD1, S.BK_BASE, S.BK_SMALL, S.BK_TINY, S.SSD_1B
SHAPE = (8, 8)


def shapes_of(t):
    return {f"diffusion_model.{v}.weight": SHAPE for v in names.module_map(t).values()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_maps_student_names(fmt):
    smap = names.module_map(BK_BASE)
    mods = {(v if fmt in LDM_FORMATS else k): SHAPE for k, v in smap.items()}
    tensors, meta, acfg, deltas = lora_for(mods, fmt)
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE), metadata=meta, adapter_config=acfg)
    assert plan.origin == "student"
    assert len(plan.to_load) == len(deltas) > 0
    assert not plan.removed and not plan.unknown and not plan.shape_mismatch
    by_target = {}
    for path in deltas:
        ldm = path if fmt in LDM_FORMATS else smap[path]
        by_target[f"diffusion_model.{ldm}.weight"] = path
    assert set(plan.to_load.values()) == set(by_target)
    if fmt in ("peft", "peft-unet"):
        assert plan.extra_alpha and all(a == 3.0 for a in plan.extra_alpha.values())
    else:
        assert not plan.extra_alpha


@pytest.mark.parametrize("student", ["base", "small", "tiny"])
@pytest.mark.parametrize("fmt", ["kohya", "peft", "kohya-ldm"])
def test_teacher_lora_lands_on_corresponding_blocks(student, fmt):
    cfg = {"base": BK_BASE, "small": BK_SMALL, "tiny": BK_TINY}[student]
    tmap, smap = names.module_map(SD1_TEACHER), names.module_map(cfg)
    mods = {(tmap[k] if fmt in LDM_FORMATS else k): SHAPE for k in tmap}
    tensors, meta, acfg, deltas = lora_for(mods, fmt)
    plan = lk.plan_lora(tensors, cfg, shapes_of(cfg), metadata=meta)
    assert plan.origin == "teacher"
    inv = {v: k for k, v in tmap.items()}
    want = {}
    for path in deltas:
        tpath = inv[path] if fmt in LDM_FORMATS else path
        s = expected_bk(tpath, cfg)
        if s is not None:
            want[tpath] = f"diffusion_model.{smap[s]}.weight"
    got = {}
    for prefix, key in plan.to_load.items():
        pm = lk.parse_prefix(prefix, lk.underscore_table([cfg, SD1_TEACHER]))
        got[pm.path if pm.layout == "diffusers" else inv[pm.path]] = key
    assert got == want
    assert len(plan.removed) == len(deltas) - len(want)
    assert not plan.uncertain and not plan.unknown and not plan.shape_mismatch
    # each student weight receives at most one teacher module
    assert len(set(plan.to_load.values())) == len(plan.to_load)


def test_student_ldm_lora_not_mistaken_for_teacher():
    smap = names.module_map(BK_BASE)
    tensors, *_ = lora_for({v: SHAPE for v in smap.values()}, "ldm")
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE))
    assert plan.origin == "student"
    assert all(p[len("diffusion_model."):] + ".weight" == k[len("diffusion_model."):] or
               p == k[:-len(".weight")] for p, k in plan.to_load.items())


def test_ssd1b_certain_uncertain_removed():
    tmap = names.module_map(S.SDXL)
    attn = {v: SHAPE for v in tmap.values() if ".transformer_blocks." in v and v.endswith("attn1.to_q")}
    tensors, *_ = lora_for(attn, "kohya-ldm")
    plan = lk.plan_lora(tensors, SSD1B, shapes_of(SSD1B))
    assert plan.origin == "teacher"
    # kept depth: down level 1 (2+2), up level 1 attentions 0 (2), up_blocks.0.attentions.2 (10);
    # middle attention removed; down level 2: 10 -> 4 (4 uncertain, 6 removed, twice)
    assert len(plan.to_load) == 2 + 2 + 2 + 10
    assert len(plan.uncertain) == 2 * 4 + 2 * 4 + 1 + 1   # down L2, up_blocks.0.attn 0/1, up_blocks.1.attn 1/2
    assert len(plan.removed) == 70 - len(plan.to_load) - len(plan.uncertain)
    applied = lk.plan_lora(tensors, SSD1B, shapes_of(SSD1B), apply_uncertain=True)
    assert len(applied.to_load) == len(plan.to_load) + len(plan.uncertain)
    assert "uncertain" in plan.summary()


def test_family_mismatch_and_unknown_keys():
    tmap = names.module_map(S.SDXL)
    mods = {k: (64, 2048) for k in tmap if k.endswith("attn2.to_k")}
    tensors, *_ = lora_for(mods, "kohya")
    assert "SDXL" in lk.family_mismatch(tensors, BK_BASE)
    assert lk.family_mismatch(tensors, SSD1B) is None
    tensors = {"foo.bar": torch.zeros(1),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 1),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 3),
               "lora_unet_nonsense_block.lora_up.weight": torch.zeros(2, 1)}
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE))
    assert plan.text_encoder == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert sorted(plan.unknown) == ["foo.bar", "lora_unet_nonsense_block.lora_up.weight"]
    assert not plan.to_load


def test_peft_alpha_pattern_and_rslora():
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}, "use_rslora": False}
    assert lk._peft_alpha("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", cfg, 4) == 2.0
    assert lk._peft_alpha("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", cfg, 4) == 8.0
    assert lk._peft_alpha("x.to_q", dict(cfg, use_rslora=True), 4) == pytest.approx(16.0)


def test_shape_mismatch_is_dropped_not_applied():
    smap = names.module_map(BK_BASE)
    path = next(k for k in smap if k.endswith("attn1.to_q"))
    tensors, *_ = lora_for({path: (8, 16)}, "kohya")
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE))
    assert not plan.to_load and len(plan.shape_mismatch) == 1
