"""Key normaliser and teacher->student mapping (host-free; shapes are uniform stand-ins here, the real
shapes and the patched weights are checked in tests/comfy/test_lora_node.py)."""

from __future__ import annotations

import pytest
import torch

from distilled_unets.models import lora_keys as lk
from tests._lora_fixtures import FORMATS, LDM_FORMATS, expected_bk, lora_for

BK_BASE = dict(num_res_blocks=[1] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 0],
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, context_dim=768)
BK_SMALL = dict(BK_BASE, transformer_depth_middle=-2)
BK_TINY = dict(num_res_blocks=[1] * 3, channel_mult=[1, 2, 4], transformer_depth=[1, 1, 1],
               transformer_depth_output=[1] * 6, transformer_depth_middle=-2, context_dim=768)
SSD1B = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 4, 4],
             transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4], transformer_depth_middle=-1,
             context_dim=2048, adm_in_channels=2816)
SD1_TEACHER = dict(lk.SD1_TEACHER, context_dim=768)
SHAPE = (8, 8)


def shapes_of(cfg):
    return {f"diffusion_model.{v}.weight": SHAPE for v in lk.unet_module_map(cfg).values()}


def test_module_map_matches_diffusers_names():
    diffusers = pytest.importorskip("diffusers")
    for cfg, lpb, nlev, mid in ((SD1_TEACHER, 2, 4, True), (BK_BASE, 1, 4, True), (BK_SMALL, 1, 4, False),
                                (BK_TINY, 1, 3, False)):
        down = ["CrossAttnDownBlock2D"] * 3 + (["DownBlock2D"] if nlev == 4 else [])
        up = (["UpBlock2D"] if nlev == 4 else []) + ["CrossAttnUpBlock2D"] * 3
        with torch.device("meta"):
            u = diffusers.UNet2DConditionModel(
                block_out_channels=[32, 64, 128, 128][:nlev], layers_per_block=lpb, down_block_types=down,
                up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn" if mid else None,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        names = {k[:-len(".weight")] for k in u.state_dict() if k.endswith(".weight")}
        assert set(lk.unet_module_map(cfg)) == names


def test_module_map_non_uniform_blocks():
    cfg = dict(num_res_blocks=[2, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[1, 1, 1, 1],
               transformer_depth_output=[1] * 7, transformer_depth_middle=1)
    mp = lk.unet_module_map(cfg)
    # level 0: input_blocks 1, 2, then the downsampler at 3; level 1's resnet is input_blocks.4
    assert mp["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert mp["down_blocks.1.resnets.0.conv1"] == "input_blocks.4.0.in_layers.2"
    assert mp["up_blocks.2.resnets.2.conv1"] == "output_blocks.6.0.in_layers.2"
    assert mp["up_blocks.1.upsamplers.0.conv"] == "output_blocks.3.2.conv"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_maps_student_names(fmt):
    smap = lk.unet_module_map(BK_BASE)
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
    tmap, smap = lk.unet_module_map(SD1_TEACHER), lk.unet_module_map(cfg)
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
        pm = lk.parse_prefix(prefix, lk._underscore_table([cfg, SD1_TEACHER]))
        got[pm.path if pm.layout == "diffusers" else inv[pm.path]] = key
    assert got == want
    assert len(plan.removed) == len(deltas) - len(want)
    assert not plan.uncertain and not plan.unknown and not plan.shape_mismatch
    # each student weight receives at most one teacher module
    assert len(set(plan.to_load.values())) == len(plan.to_load)


def test_student_ldm_lora_not_mistaken_for_teacher():
    smap = lk.unet_module_map(BK_BASE)
    tensors, *_ = lora_for({v: SHAPE for v in smap.values()}, "ldm")
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE))
    assert plan.origin == "student"
    assert all(p[len("diffusion_model."):] + ".weight" == k[len("diffusion_model."):] or
               p == k[:-len(".weight")] for p, k in plan.to_load.items())


def test_ssd1b_certain_uncertain_removed():
    tmap = lk.unet_module_map(lk.SDXL_TEACHER)
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
    tmap = lk.unet_module_map(lk.SDXL_TEACHER)
    mods = {k: (64, 2048) for k in tmap if k.endswith("attn2.to_k")}
    tensors, *_ = lora_for(mods, "kohya")
    assert "SDXL" in lk.family_mismatch(tensors, BK_BASE)
    assert lk.family_mismatch(tensors, SSD1B) is None
    tensors = {"foo.bar": torch.zeros(1), "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 1),
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
    smap = lk.unet_module_map(BK_BASE)
    path = next(k for k in smap if k.endswith("attn1.to_q"))
    tensors, *_ = lora_for({path: (8, 16)}, "kohya")
    plan = lk.plan_lora(tensors, BK_BASE, shapes_of(BK_BASE))
    assert not plan.to_load and len(plan.shape_mismatch) == 1
