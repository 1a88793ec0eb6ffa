"""The one diffusers <-> ldm name map (models/structure/names.py) against diffusers' and ComfyUI's own module names."""

from __future__ import annotations

import pytest
from distilled_unets.models.structure import names
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.registry import REGISTRY
from distilled_unets.models.structure.topology import Topology, diffusers_config

from ..layouts import meta_shapes


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.id for e in REGISTRY])
def test_module_map_is_every_diffusers_weight_module(entry):
    """Every weight/bias of the diffusers model belongs to exactly one mapped module, and nothing else is mapped."""
    mods = {k.rpartition(".")[0] for k in meta_shapes(diffusers_config(entry.structure))}
    assert set(names.module_map(entry.structure)) == mods


def test_uneven_resnets_per_level():
    """Where comfy.utils.unet_to_diffusers numbers blocks wrongly (its block index uses the current level's count
    for every earlier level), ours follows UNetModel's build order."""
    t = Topology("sd1", 320, (1, 2, 4), (2, 1, 1), (1, 1, 1, 1), (1,) * 7, 1, 768, False)
    mp = names.module_map(t)
    assert mp["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert mp["down_blocks.1.resnets.0.conv1"] == "input_blocks.4.0.in_layers.2"
    assert mp["up_blocks.2.resnets.2.conv1"] == "output_blocks.6.0.in_layers.2"
    assert mp["up_blocks.1.upsamplers.0.conv"] == "output_blocks.3.2.conv"
    assert names.ldm_module_map(t)["output_blocks.6.0.in_layers.2"] == "up_blocks.2.resnets.2.conv1"


def test_units_and_keys():
    t = S.BK_TINY
    assert names.diffusers_key_to_ldm("up_blocks.0.upsamplers.0.conv.weight", t) == "output_blocks.1.2.conv.weight"
    assert names.diffusers_key_to_ldm("down_blocks.3.resnets.0.conv1.weight", t) is None
    u = names.unit_of("output_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", t)
    assert (u.kind, u.side, u.level, u.index, u.depth) == ("attention", "out", 2, 1, 1)
    assert u.diffusers == "up_blocks.0.attentions.1"
    kinds = [x.kind for x in names.units(S.SDXL)]
    assert kinds.count("attention") == 2 + 2 + 1 + 3 + 3
    assert sum(x.depth for x in names.units(S.SDXL)) == 70
