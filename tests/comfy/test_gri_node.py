"""Host tests (real ComfyUI, CPU, tiny random UNets): the GRIAttention node and its attn1 replaces."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(scope="module")
def tm():
    import _tiny_models

    warnings.filterwarnings("ignore", message="Should have tb<=t1")
    torch.set_num_threads(1)
    return _tiny_models


@pytest.fixture(scope="module")
def node_mod():
    from distilled_unets.nodes import attention

    return attention


@pytest.fixture
def spy(monkeypatch):
    """Every call of a GRI replace: (block, block_index, sigma, H, W, ran_gri)."""
    from distilled_unets.models.patches import gri

    calls: list = []
    original = gri.GRIReplace.__call__

    def wrapped(self, q, k, v, extra):
        hw = self.grid(q, k, extra)
        shape = extra["activations_shape"]
        calls.append((tuple(extra["block"]), extra["block_index"], float(extra["sigmas"].max()),
                      int(shape[-2]), int(shape[-1]), hw is not None, self.shift))
        return original(self, q, k, v, extra)

    monkeypatch.setattr(gri.GRIReplace, "__call__", wrapped)
    return calls


def _sample(model, family="sd15", steps=4, size=16, seed=3, cfg=5.0):
    import _tiny_models as tm
    import comfy.sample

    pos, neg = tm.conditioning(family)
    lat = tm.latent(size)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, lat, seed=seed,
                               disable_pbar=True)


def _gri(node_mod, model, window=4, pool=2, levels=1, start=0.0, end=1.0, output_blocks=True, shifted=True):
    return node_mod.GRIAttention.execute(model, window, pool, levels, start, end, output_blocks, shifted).result[0]


# topologies: (family, topology name in _tiny_models, latent size); tiny widths
CASES = [("sd15", "SD15_TOPOLOGY", 16), ("sd15", "TINY_SD_TOPOLOGY", 16), ("sd20", "MINI_TOPOLOGY", 16),
         ("sdxl", "SDXL_MINI_TOPOLOGY", 16)]


@pytest.mark.parametrize("family,topo,size", CASES)
def test_every_family_and_student_topology(tm, node_mod, spy, family, topo, size):
    """Degenerate settings give the unpatched samples; real settings run GRI on exactly the top level."""
    from distilled_unets.models.patches import gri

    model = tm.build(family, getattr(tm, topo), seed=0)
    base = _sample(model, family, steps=2, size=size)
    sites = gri.attention_sites(model.model.diffusion_model)
    top = [s for s in sites if s.attn_rank == 0]
    assert top and len({s.level for s in top}) == 1

    exact = _gri(node_mod, model, window=64, pool=4)  # window covers every grid -> exact attention
    out = _sample(exact, family, steps=2, size=size)
    rel = ((out - base).abs().max() / base.abs().max()).item()
    assert rel < 1e-5, rel  # float rounding only (SDPA here vs ComfyUI's CPU backend unpatched)
    assert spy and all(ran for *_, ran, _s in spy)
    spy.clear()

    fast = _gri(node_mod, model, window=2, pool=2)
    out = _sample(fast, family, steps=2, size=size)
    assert ((out - base).abs().max() / base.abs().max()).item() > 1e-3  # GRI really changed something
    keys = {(b[0], b[1], j) for b, j, *_ in spy}
    assert keys == {s.key for s in top}
    level_hw = {(h, w) for _b, _j, _sigma, h, w, _ran, _s in spy}
    expected = -(-size // 2 ** top[0].level)
    assert level_hw == {(expected, expected)}


def test_percent_range_and_levels(tm, node_mod, spy):
    from distilled_unets.models.patches import gri

    model = tm.build("sd15", tm.SD15_TOPOLOGY, seed=0)
    ms = model.get_model_object("model_sampling")
    patched = _gri(node_mod, model, window=4, pool=2, start=0.3, end=0.7)
    _sample(patched, steps=8)
    hi, lo = ms.percent_to_sigma(0.3), ms.percent_to_sigma(0.7)
    assert any(ran for *_, ran, _ in spy) and any(not ran for *_, ran, _ in spy)
    for _b, _j, sigma, _h, _w, ran, _s in spy:
        assert ran == (lo <= sigma <= hi), (sigma, lo, hi, ran)
    sites = gri.attention_sites(model.model.diffusion_model)
    assert {(b[0], b[1], j) for b, j, *_ in spy} == {s.key for s in sites if s.attn_rank == 0}

    spy.clear()
    two = _gri(node_mod, model, window=4, pool=2, levels=2, output_blocks=False)
    _sample(two, steps=1)
    assert {(b[0], b[1], j) for b, j, *_ in spy} == {s.key for s in sites
                                                     if s.attn_rank < 2 and s.block_name == "input"}
    assert {(h, w) for _b, _j, _s, h, w, *_ in spy} == {(16, 16), (8, 8)}
    # shifted windows: alternate blocks of a level get half a window
    shifts = {(b[0], b[1]): s for b, _j, _sg, _h, _w, _r, s in spy}
    assert sorted(shifts.values()) == [0, 0, 2, 2]


def test_cross_attention_untouched_and_input_model_unchanged(tm, node_mod):
    import copy

    model = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=0)
    before_opts = copy.copy(model.model_options)
    before_to = copy.deepcopy(model.model_options["transformer_options"])
    before = _sample(model, steps=2)
    patched = _gri(node_mod, model, window=4, pool=2, levels=8)  # every level, output blocks too
    _sample(patched, steps=2)
    after = _sample(model, steps=2)
    assert torch.equal(before, after)
    assert model.model_options == before_opts and model.model_options["transformer_options"] == before_to
    assert "patches_replace" not in model.model_options["transformer_options"]
    pr = patched.model_options["transformer_options"]["patches_replace"]
    assert set(pr) == {"attn1"}  # only self-attention; attn2 (the prompt) is never replaced
    assert "patches" not in patched.model_options["transformer_options"]
    assert patched.model is model.model  # a clone: same weights, own options


def test_chains_an_existing_replace_and_composes_with_hypertile(tm, node_mod, spy):
    from comfy.ldm.modules.attention import optimized_attention

    model = tm.build("sd15", tm.SD15_TOPOLOGY, seed=0)
    other: list = []

    def other_pack(q, k, v, extra):
        other.append(float(extra["sigmas"].max()))
        return optimized_attention(q, k, v, extra["n_heads"])

    m = model.clone()
    m.set_model_attn1_replace(other_pack, "input", 1)  # 2-tuple key, as many packs register
    m.set_model_attn1_replace(other_pack, "input", 4, 0)  # a level GRI does not touch
    ms = m.get_model_object("model_sampling")
    patched = _gri(node_mod, m, window=4, pool=2, start=0.5, end=1.0)
    pr = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert pr[("input", 4, 0)] is other_pack and pr[("input", 1)] is other_pack
    _sample(patched, steps=6)
    switch = ms.percent_to_sigma(0.5)
    in1 = [c for c in spy if c[0] == ("input", 1)]
    assert all(ran == (sigma <= switch) for _b, _j, sigma, _h, _w, ran, _s in in1)
    # the other pack's replace still runs: on input 4 always, on input 1 where GRI is off
    n_steps_before = sum(1 for c in in1 if not c[5])
    assert n_steps_before > 0 and len(other) == n_steps_before + len([c for c in spy if c[0] == ("input", 1)])

    # HyperTile re-tiles the tokens before attn1: GRI sees a non-grid and leaves those calls exact
    from comfy_extras.nodes_hypertile import HyperTile

    spy.clear()
    res = HyperTile.execute(model, 64, 1, 0, False)  # 8x8-token tiles on the 16x16 top level
    ht = res[0] if isinstance(res, tuple) else res.result[0]
    both = _gri(node_mod, ht, window=4, pool=2)
    out = _sample(both, steps=2, size=16)
    assert spy and not any(ran for *_, ran, _ in spy)
    assert torch.allclose(out, _sample(ht, steps=2, size=16), rtol=1e-6, atol=1e-5)


class _Choice:
    """Stands in for newer ComfyUI's per-layer attention choice (CrossAttention.comfy_attention)."""


@pytest.fixture
def record_backend(monkeypatch):
    """Every call of ComfyUI's optimized_attention (the real one runs): the kwargs it got."""
    import comfy.ldm.modules.attention as attn

    calls: list = []
    real = attn.optimized_attention

    def recording(q, k, v, heads, *args, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("preferred_attention", None)  # hosts before the per-layer choice take no such argument
        return real(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(attn, "optimized_attention", recording)
    return calls


def test_exact_fallback_passes_the_layers_attention_choice(node_mod, record_backend):
    """Outside GRI's range the fallback runs the host's exact attention as the layer would: with the
    layer's own choice (``preferred_attention``) when the layer has one, without the argument when not
    (ComfyUI 0.3.64 / 0.33 layers), and the same numbers either way."""
    import types

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 64, generator=g) for _ in range(3))
    to = {"sigmas": torch.tensor([1.0])}
    choice = _Choice()
    with_choice = node_mod.ExactAttention(types.SimpleNamespace(comfy_attention=choice))
    without = node_mod.ExactAttention(types.SimpleNamespace())
    a = with_choice(q, k, v, 4, attn_precision=None, transformer_options=to)
    b = without(q, k, v, 4, attn_precision=None, transformer_options=to)
    c = node_mod.ExactAttention(None)(q, k, v, 4)
    assert record_backend[0]["preferred_attention"] is choice and record_backend[0]["transformer_options"] is to
    assert "preferred_attention" not in record_backend[1] and "preferred_attention" not in record_backend[2]
    assert torch.equal(a, b) and torch.equal(a, c)
    import copy

    assert copy.deepcopy({"f": with_choice})["f"] is with_choice  # clones never copy the layer


def test_sampling_outside_the_range_uses_each_layers_choice(tm, node_mod, spy, record_backend):
    """GRI on [0.5, 1]: in the first half every patched layer falls back to exact attention with ITS OWN
    choice (a layer without one: no argument); its samples equal the unpatched model's there."""
    from distilled_unets.models.patches import gri

    model = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=0)
    dm = model.model.diffusion_model
    chosen = gri.select_sites(gri.attention_sites(dm), 1)
    layers = [gri.site_attention(dm, s) for s in chosen]
    assert all(layer is not None and hasattr(layer, "to_q") for layer in layers)
    choice_by_key = {}
    for site, layer in zip(chosen[:-1], layers[:-1]):  # the last patched layer keeps the host's default
        choice_by_key[site.key] = layer.comfy_attention = _Choice()
    try:
        patched = _gri(node_mod, model, window=2, pool=2, start=0.5, end=1.0)
        _sample(patched, steps=4)
        fell_back = [(b[0], b[1], j) for b, j, *_, ran, _s in spy if not ran]
        assert fell_back and any(ran for *_, ran, _ in spy) and chosen[-1].key in fell_back
        passed = [c["preferred_attention"] for c in record_backend if "preferred_attention" in c]
        # each fallback call of a layer with a choice carried exactly that layer's object, in call order
        expected = [choice_by_key[key] for key in fell_back if key in choice_by_key]
        assert len(passed) == len(expected) and all(a is b for a, b in zip(passed, expected))
        # fall back everywhere (range ends before sampling starts): identical to the unpatched model
        record_backend.clear()
        never = _gri(node_mod, model, window=2, pool=2, start=1.0, end=1.0)
        assert torch.equal(_sample(never, steps=2), _sample(model, steps=2))
    finally:
        for layer in layers:
            layer.__dict__.pop("comfy_attention", None)


def test_patch_one_unet_of_a_multi_unet_model(tm, node_mod, spy):
    from distilled_unets.nodes import sampling

    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    early = _gri(node_mod, small, window=4, pool=2)
    multi = sampling.MultiUNetModel.execute(early, full, 0.5).result[0]
    _sample(multi, steps=6)
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
    assert spy and min(sigma for _b, _j, sigma, *_ in spy) > switch  # only while the early UNet runs


def test_schema_errors_and_registration(tm, node_mod):
    from distilled_unets.models.errors import PackError
    from distilled_unets.nodes import NODE_CLASSES

    assert node_mod.GRIAttention in NODE_CLASSES
    schema = node_mod.GRIAttention.define_schema()
    assert schema.node_id == "GRIAttention" and schema.category == "distilled_unets/model_patches"
    assert [i.id for i in schema.inputs] == ["model", "window_size", "pool_factor", "levels", "start_percent",
                                             "end_percent", "output_blocks", "shifted_windows"]
    assert all(i.tooltip for i in schema.inputs) and schema.description
    model = tm.build("sd15", seed=0)
    with pytest.raises(PackError, match="GRIAttention.*end_percent"):
        _gri(node_mod, model, start=0.8, end=0.2)


def test_example_workflow_matches_the_schema():
    from _workflows import check_pack_nodes, load

    wf = load("gri_sd15_student_1024.json")
    by_id = {n["id"]: n for n in wf["nodes"]}
    types = [n["type"] for n in wf["nodes"]]
    assert {"DistilledUNetLoader", "GRIAttention", "KSampler", "MarkdownNote"} <= set(types)
    check_pack_nodes(wf)
    links = {link[0]: link for link in wf["links"]}
    gri_node = next(n for n in wf["nodes"] if n["type"] == "GRIAttention")
    src = links[gri_node["inputs"][0]["link"]]
    assert by_id[src[1]]["type"] == "DistilledUNetLoader"
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    model_link = links[next(i["link"] for i in ks["inputs"] if i["name"] == "model")]
    assert model_link[1] == gri_node["id"]
    latent = next(n for n in wf["nodes"] if n["type"] == "EmptyLatentImage")
    assert latent["widgets_values"][:2] == [1024, 1024]
