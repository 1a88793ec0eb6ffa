"""Structural detection of every reference topology, full size on the meta device, in three layouts."""

from __future__ import annotations

import pytest
from distilled_unets.models.structure import registry
from distilled_unets.models.structure.cost import unet_cost
from distilled_unets.models.structure.detect import detect, from_diffusers_config
from distilled_unets.models.structure.topology import from_comfy_config

from ..layouts import cases, layouts, meta_shapes, to_ldm

CASES = cases()
IDS = [c[0] for c in CASES]

# the ComfyUI ldm configs from the reference tables that detection must reproduce
LDM_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_output",
              "transformer_depth_middle", "context_dim", "use_linear_in_transformer", "adm_in_channels")


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    model_id, entry, cfg = request.param
    return model_id, entry, cfg, meta_shapes(cfg)


def test_every_reference_model_is_covered():
    ids = {e.id for e in registry.REGISTRY}
    assert len(CASES) == 22  # 19 released students + 3 teachers with a known structure
    for must in ("segmind/tiny-sd", "nota-ai/bk-sdm-v2-tiny", "IDKiro/sdxs-512-0.9", "segmind/SSD-1B",
                 "etri-vilab/koala-lightning-1b"):
        assert must in ids
    # every entry is reachable: identify() names it from its own structure and name
    for e in registry.REGISTRY:
        assert registry.identify(e.structure, e.id)[0] is e


@pytest.mark.parametrize("layout", ["diffusers", "ldm", "ldm-gapped"])
def test_full_size_structure_detected(case, layout):
    model_id, entry, cfg, shapes = case
    files = layouts(shapes, cfg)
    det = detect(files[layout])
    got = det.topology.comfy_unet_config()
    for f in LDM_FIELDS:
        assert got[f] == entry.structure.comfy_unet_config()[f], (model_id, layout, f)
    assert det.topology.family == entry.family
    assert det.topology.signature() == entry.structure.signature()
    best, same = registry.identify(det.topology, model_id)
    assert best is not None and best.id == model_id, (model_id, best and best.id)
    assert model_id in [e.id for e in same]
    # every tensor of the file has an ldm name, and the names are unique
    assert len(set(det.key_map.values())) == len(files[layout])
    if layout == "diffusers":
        assert det.layout == "diffusers"
    elif layout == "ldm":
        assert det.layout == "ldm"


def test_gapped_files_of_students_are_recognised_as_gapped(case):
    model_id, entry, cfg, shapes = case
    det = detect(to_ldm(shapes, cfg, gapped=True))
    if entry.structure.num_res_blocks[0] == 1:
        assert det.layout == "ldm-gapped"
        ins = {int(k.split(".")[1]) for k in det.key_map.values() if k.startswith("input_blocks.")}
        assert ins == set(range(len(ins)))  # renumbered without holes


def test_config_json_gives_the_same_structure(case):
    model_id, entry, cfg, _ = case
    assert from_diffusers_config(cfg).signature() == entry.structure.signature()


def test_exact_parameter_counts(case):
    model_id, entry, cfg, shapes = case
    import math

    n = sum(math.prod(s) for s in shapes.values())
    assert unet_cost(entry.structure).params == entry.params == n


def test_known_collisions_are_broken():
    v2tiny = registry.by_id("nota-ai/bk-sdm-v2-tiny").structure
    sdxs = registry.by_id("IDKiro/sdxs-512-0.9").structure
    assert v2tiny.comfy_unet_config()["transformer_depth"] == sdxs.comfy_unet_config()["transformer_depth"]
    assert [e.id for e in registry.matches(v2tiny)] == ["nota-ai/bk-sdm-v2-tiny"]
    assert [e.id for e in registry.matches(sdxs)] == ["IDKiro/sdxs-512-0.9"]
    assert sdxs.comfy_unet_config()["disable_self_attentions"] == [True, False, False]
    assert "disable_self_attentions" not in v2tiny.comfy_unet_config()
    # structurally identical models are named by the file name when it says which
    small = registry.by_id("segmind/small-sd").structure
    assert registry.identify(small, "models/unet/bk-sdm-base-2m.safetensors")[0].id == "nota-ai/bk-sdm-base-2m"
    assert registry.identify(small, "small-sd/unet")[0].id == "segmind/small-sd"
    tiny = registry.by_id("segmind/tiny-sd").structure
    assert registry.identify(tiny, "bk-sdm-tiny")[0].id == "nota-ai/bk-sdm-tiny"
    koala = registry.by_id("etri-vilab/koala-700m").structure
    assert registry.identify(koala, "koala-lightning-700m.safetensors")[0].id == "etri-vilab/koala-lightning-700m"


def test_unknown_prune_still_detected():
    """An A-SDM-style mix (uneven resnets per level, no registry entry) is detected, not refused."""
    cfg = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=[2, 1, 1, 1], cross_attention_dim=768,
               attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, mid_block_type=None)
    det = detect(meta_shapes(cfg))
    t = det.topology
    assert t.num_res_blocks == (2, 1, 1, 1)
    assert t.transformer_depth == (1, 1, 1, 1, 0)
    assert t.output_depths() == [0, 0, 1, 1, 1, 1, 1, 1, 1]  # up levels hold 2, 2, 2, 3 blocks
    assert t.transformer_depth_middle == -2
    assert registry.identify(t)[0] is None
    text = registry.info_text(registry.describe(t))
    assert "Unknown SD 1.x structure" in text


def test_info_text_for_a_student():
    t = registry.by_id("segmind/tiny-sd").structure
    d = registry.describe(t, "tiny-sd")
    text = registry.info_text(d, "diffusers", "eps")
    assert "segmind/tiny-sd" in text and "nota-ai/bk-sdm-tiny" in text
    assert "323,384,964" in text and "859,520,964" in text
    assert "dpmpp_2m / karras, 25 steps, CFG 7.0, 512x512" in text
    assert 0.2 < d["step_cost_ratio"] < 0.9
    assert d["param_ratio"] == pytest.approx(323384964 / 859520964)


def test_from_comfy_config_roundtrip():
    for e in registry.REGISTRY:
        assert from_comfy_config(e.structure.comfy_unet_config()).signature() == e.structure.signature()
