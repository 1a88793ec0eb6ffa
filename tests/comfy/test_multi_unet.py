"""Host tests (real ComfyUI, CPU, tiny random UNets): multi-UNet routing inside one sampler run."""

from __future__ import annotations

import copy

import pytest
import torch

STEPS = 4
SCHEDULERS = ("karras", "normal")
# Samplers of comfy.samplers.KSampler.SAMPLERS that cannot run here; every other one is tested.
# (On CPU with a tiny SD1.5-class UNet all 42 names of ComfyUI 0.3.64 run, so none is skipped.)
SKIPPED_SAMPLERS: dict[str, str] = {}


@pytest.fixture(scope="module")
def nodes_mod():
    from distilled_unets.nodes import sampling

    return sampling


def _sample(model, sampler="euler", scheduler="karras", steps=STEPS, family="sd15", seed=3, cfg=5.0, size=8):
    import _tiny_models as tm
    import comfy.sample

    pos, neg = tm.conditioning(family)
    lat = tm.latent(size)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, lat, seed=seed,
                               disable_pbar=True)


def _spy(patcher, log: list, tag: str):
    """Record (tag, sigma) of every UNet forward of ``patcher`` via a keyed DIFFUSION_MODEL wrapper
    (it travels in the patcher's own transformer_options; numerics are untouched)."""
    import comfy.patcher_extension as pe

    def wrapper(executor, *args, **kwargs):
        to = args[5] if len(args) > 5 else kwargs["transformer_options"]
        log.append((tag, float(to["sigmas"].reshape(-1)[0])))
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", wrapper)
    return patcher


def _schedule(model, scheduler, steps, sampler="euler"):
    """The sigmas KSampler really samples (dpm_2 / uni_pc drop the penultimate one)."""
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps, "cpu", sampler, scheduler).sigmas.tolist()


# ------------------------------------------------------------------------------------------------
# same UNet twice == one plain run, for every sampler


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_model_twice_is_bit_identical_for_every_sampler(tm, nodes_mod, scheduler):
    import comfy.samplers

    torch.set_num_threads(1)
    base = tm.build("sd15", seed=0)
    calls: list = []
    early = _spy(base.clone(), calls, "early")
    late = _spy(base.clone(), calls, "late")
    multi = nodes_mod.MultiUNetModel.execute(early, late, 0.5).result[0]
    tested, failed = [], []
    for name in comfy.samplers.KSampler.SAMPLERS:
        if name in SKIPPED_SAMPLERS:
            continue
        calls.clear()
        plain = _sample(base, name, scheduler)
        routed = _sample(multi, name, scheduler)
        tags = {t for t, _ in calls}
        assert tags == {"early", "late"}, f"{name}: both UNets must run, saw {tags}"
        (tested if torch.equal(plain, routed) else failed).append(name)
    assert not failed, f"not bit-identical with {scheduler}: {failed}"
    assert len(tested) == len(comfy.samplers.KSampler.SAMPLERS) - len(SKIPPED_SAMPLERS)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "euler_ancestral", "uni_pc"])
def test_same_patcher_object_twice_and_sdxl(tm, nodes_mod, sampler):
    sd15 = tm.build("sd15", seed=0)
    multi = nodes_mod.MultiUNetModel.execute(sd15, sd15, 0.4).result[0]
    assert torch.equal(_sample(sd15, sampler), _sample(multi, sampler))
    xl = tm.build("sdxl", seed=0)
    multi = nodes_mod.MultiUNetModel.execute(xl, xl.clone(), 0.4).result[0]
    assert torch.equal(_sample(xl, sampler, family="sdxl"), _sample(multi, sampler, family="sdxl"))


def test_multi_unet_ksampler_equals_ksampler_with_same_model(tm, nodes_mod):
    import comfy.sample

    m = tm.build("sd15", seed=0)
    pos, neg = tm.conditioning("sd15")
    lat = {"samples": tm.latent(8)}
    for sampler, sched, k in [("dpmpp_2m_sde", "karras", 2), ("heun", "normal", 3), ("euler", "karras", 0)]:
        out = nodes_mod.MultiUNetKSampler.execute(m, m.clone(), 7, STEPS, k, 5.0, sampler, sched, pos, neg,
                                                  lat, 1.0).result[0]
        noise = comfy.sample.prepare_noise(lat["samples"], 7)
        ref = comfy.sample.sample(m, noise, STEPS, 5.0, sampler, sched, pos, neg, lat["samples"], seed=7,
                                  disable_pbar=True)
        assert torch.equal(out["samples"], ref), (sampler, sched, k)


# ------------------------------------------------------------------------------------------------
# two different UNets: each runs exactly where it should


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"])
def test_switch_step_routes_each_step_to_its_unet(tm, nodes_mod, sampler):
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    pos, neg = tm.conditioning("sd15")
    steps = 6
    sig = _schedule(full, "karras", steps, sampler)
    for k in range(steps + 1):
        calls: list = []
        out = nodes_mod.MultiUNetKSampler.execute(
            _spy(full.clone(), calls, "late"), _spy(small.clone(), calls, "early"), 5, steps, k, 4.0,
            sampler, "karras", pos, neg, {"samples": tm.latent(8)}, 1.0).result[0]
        assert torch.isfinite(out["samples"]).all()
        early = [s for t, s in calls if t == "early"]
        late = [s for t, s in calls if t == "late"]
        assert early == pytest.approx(sig[:k], rel=1e-6), (sampler, k)
        assert late == pytest.approx(sig[k:steps], rel=1e-6), (sampler, k)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_sde", "dpm_2"])
def test_switch_step_with_intermediate_sigmas(tm, nodes_mod, sampler):
    """Second-order samplers also evaluate between schedule sigmas: steps before k (their intermediate
    sigmas included) run early; from sigmas[k] down everything runs late."""
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    pos, neg = tm.conditioning("sd15")
    steps, k = 6, 3
    sig = _schedule(full, "karras", steps, sampler)
    calls: list = []
    nodes_mod.MultiUNetKSampler.execute(_spy(full.clone(), calls, "late"),
                                        _spy(small.clone(), calls, "early"),
                                        5, steps, k, 4.0, sampler, "karras", pos, neg,
                                        {"samples": tm.latent(8)}, 1.0)
    early = [s for t, s in calls if t == "early"]
    late = [s for t, s in calls if t == "late"]
    assert early and late
    assert min(early) > sig[k] and max(late) <= sig[k] * (1 + 1e-6)
    def has(xs, v):
        return any(abs(x - v) <= 1e-5 * v for x in xs)

    assert early[0] == pytest.approx(sig[0]) and has(early, sig[k - 1])  # step k-1 started early
    assert has(late, sig[k]) and has(late, sig[steps - 1])  # step k and the last one run late


def test_switch_percent_routes_by_model_sampling_sigma(tm, nodes_mod):
    from distilled_unets.models.patches.multi_unet import steps_per_stage

    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    calls: list = []
    multi = nodes_mod.MultiUNetModel.execute(_spy(small.clone(), calls, "early"),
                                             _spy(full.clone(), calls, "late"), 0.4).result[0]
    _sample(multi, "dpmpp_2m", "normal", steps=10)
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.4)
    early = [s for t, s in calls if t == "early"]
    late = [s for t, s in calls if t == "late"]
    assert early and late and min(early) > switch >= max(late)
    sig = _schedule(full, "normal", 10)
    assert [len(early), len(late)] == steps_per_stage(sig, [switch])
    # the edges: 0 → late UNet only, 1 → early UNet only
    for p, expect in [(0.0, {"late"}), (1.0, {"early"})]:
        calls.clear()
        multi = nodes_mod.MultiUNetModel.execute(_spy(small.clone(), calls, "early"),
                                                 _spy(full.clone(), calls, "late"), p).result[0]
        _sample(multi, "euler")
        assert {t for t, _ in calls} == expect


def test_early_unet_is_loaded_with_the_main_one(tm, nodes_mod):
    import comfy.model_management as mm

    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    multi = nodes_mod.MultiUNetModel.execute(small, full, 0.5).result[0]
    _sample(multi)
    loaded = [p.model for p in mm.loaded_models()]
    assert any(m is small.model for m in loaded) and any(m is full.model for m in loaded)


def test_downstream_clone_resolves_the_cloned_early_patcher(tm, nodes_mod):
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    calls: list = []
    multi = nodes_mod.MultiUNetModel.execute(_spy(small.clone(), calls, "early"), full, 0.5).result[0]
    again = multi.clone()
    (key,) = [k for k in again.additional_models if k.startswith("distilled_unets.multi_unet")]
    again.additional_models[key][0].remove_wrappers_with_key("diffusion_model", "test_spy")
    _sample(again)
    assert calls == []  # the run used the clone's early patcher, not the one captured at build time
    _sample(multi)
    assert calls


# ------------------------------------------------------------------------------------------------
# the router is a keyed APPLY_MODEL wrapper: other packs' wrappers and the single slot around it


def _by_tag(calls):
    out: dict = {}
    for t, s in calls:
        out.setdefault(t, []).append(s)
    return out


def test_router_is_a_keyed_apply_model_wrapper(tm, nodes_mod):
    import comfy.patcher_extension as pe
    from distilled_unets.models.patches.multi_unet import KEY_PREFIX, MultiUNetRouter

    multi = nodes_mod.MultiUNetModel.execute(tm.build("sd15", seed=1), tm.build("sd15", seed=2), 0.5).result[0]
    (key,) = [k for k in multi.additional_models if k.startswith(KEY_PREFIX)]
    assert multi.get_wrappers(pe.WrappersMP.APPLY_MODEL, key) and isinstance(
        multi.get_wrappers(pe.WrappersMP.APPLY_MODEL, key)[0], MultiUNetRouter)
    assert "model_function_wrapper" not in multi.model_options  # the single slot stays free


@pytest.mark.parametrize("node", ["MultiUNetModel", "MultiUNetKSampler"])
def test_later_node_overwriting_model_function_wrapper_keeps_the_early_unet(tm, nodes_mod, node):
    """Another pack's node after the multi-UNet sets model_function_wrapper WITHOUT chaining the one
    there (here: the late UNet's own, kept in the slot): the early UNet still runs every early step,
    the late UNet every late one, and the later wrapper sees every call."""
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    calls: list = []
    late = _spy(full.clone(), calls, "late")
    late.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"], **a["c"]))
    early = _spy(small.clone(), calls, "early")
    steps, k = 6, 3

    def overwrite(model):  # what such a node does: a clone, then the slot replaced
        m = model.clone()

        def later(apply_model, args):
            calls.append(("later", float(args["timestep"].reshape(-1)[0])))
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(later)
        return m

    sig = _schedule(full, "karras", steps)
    if node == "MultiUNetModel":
        switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
        multi = overwrite(nodes_mod.MultiUNetModel.execute(early, late, 0.5).result[0])
        _sample(multi, "dpmpp_2m", "karras", steps=steps)
    else:  # the KSampler builds its routing MODEL inside: overwrite the slot on its input instead
        from distilled_unets.models.patches.multi_unet import switch_sigma_from_step

        switch = switch_sigma_from_step(sig, k)
        routed = nodes_mod.make_multi_unet_model(early, late, nodes_mod.SwitchPoint.from_step(k), node=node)
        _sample(overwrite(routed), "dpmpp_2m", "karras", steps=steps)
    by = _by_tag(calls)
    assert set(by) == {"early", "late", "later"}
    assert min(by["early"]) > switch >= max(by["late"])
    assert len(by["later"]) == len(by["early"]) + len(by["late"])  # every model call went through it
    from distilled_unets.models.patches.multi_unet import steps_per_stage

    assert [len(by["early"]), len(by["late"])] == steps_per_stage(sig, [switch])


def test_late_apply_model_wrappers_stay_in_the_late_stage(tm, nodes_mod):
    """Keyed APPLY_MODEL wrappers the late UNet had (e.g. TorchCompileModel's) run only in its steps;
    one added to the routing MODEL afterwards (remove-then-add under its own key, as torch.compile does)
    does not displace the router."""
    import comfy.patcher_extension as pe

    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    full = tm.build("sd15", seed=2)
    calls: list = []

    def spy(tag):
        def wrapper(executor, *args, **kwargs):
            calls.append((tag, float(args[1].reshape(-1)[0])))
            return executor(*args, **kwargs)
        return wrapper

    late = full.clone()
    late.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "torch.compile", spy("late_apply"))
    pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "opts", spy("late_opts"), late.model_options,
                            is_model_options=True)
    multi = nodes_mod.MultiUNetModel.execute(_spy(small.clone(), calls, "early"), late, 0.5).result[0]
    again = multi.clone()
    again.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, "torch.compile")
    again.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "torch.compile", spy("downstream"))
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
    for model, expect in ((multi, {"early", "late_apply", "late_opts"}), (again, {"early", "downstream", "late_opts"})):
        calls.clear()
        _sample(model, "euler", steps=6)
        by = _by_tag(calls)
        assert set(by) == expect
        late_tags = expect - {"early"}
        assert min(by["early"]) > switch >= max(s for t in late_tags for s in by[t])
        assert len({len(by[t]) for t in late_tags}) == 1


# ------------------------------------------------------------------------------------------------
# each inner model's own patches and options, only when it runs


def test_patches_and_wrappers_apply_only_in_their_stage(tm, nodes_mod):
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1).clone()
    full = tm.build("sd15", seed=2).clone()
    seen: list = []

    def attn_patch(tag):
        def p(n, context, value, extra):
            seen.append((tag, float(extra["sigmas"].reshape(-1)[0])))
            return n, context, value
        return p

    def mfw(tag):
        def w(apply_model, args):
            seen.append((tag + "_wrapper", float(args["timestep"].reshape(-1)[0])))
            return apply_model(args["input"], args["timestep"], **args["c"])
        return w

    small.set_model_attn1_patch(attn_patch("early"))
    small.set_model_unet_function_wrapper(mfw("early"))
    full.set_model_attn1_patch(attn_patch("late"))
    full.set_model_unet_function_wrapper(mfw("late"))
    multi = nodes_mod.MultiUNetModel.execute(small, full, 0.5).result[0]
    _sample(multi, "euler", steps=6)
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
    by = {}
    for tag, s in seen:
        by.setdefault(tag, set()).add(s)
    assert set(by) == {"early", "late", "early_wrapper", "late_wrapper"}
    assert min(by["early"] | by["early_wrapper"]) > switch
    assert max(by["late"] | by["late_wrapper"]) <= switch
    assert by["early"] == by["early_wrapper"] and by["late"] == by["late_wrapper"]


def test_cfg_hooks_apply_only_in_their_stage(tm, nodes_mod):
    """sampler_cfg_function / pre- / post-CFG hooks (RescaleCFG, PerpNeg-style nodes) are called by the
    sampler, not the UNet: each runs only at the sigmas of its own UNet's stage; a stage without a
    sampler_cfg_function gets ComfyUI's plain CFG."""
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1).clone()
    full = tm.build("sd15", seed=2).clone()
    seen: list = []

    def cfg_fn(args):
        seen.append(("early_cfg", float(args["sigma"].reshape(-1)[0])))
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    def post(tag):
        def fn(args):
            seen.append((tag, float(args["sigma"].reshape(-1)[0])))
            return args["denoised"]
        return fn

    def pre(tag):
        def fn(args):
            seen.append((tag, float(args["sigma"].reshape(-1)[0])))
            return args["conds_out"]
        return fn

    small.set_model_sampler_cfg_function(cfg_fn)
    small.set_model_sampler_post_cfg_function(post("early_post"))
    full.set_model_sampler_post_cfg_function(post("late_post"))
    full.set_model_sampler_pre_cfg_function(pre("late_pre"))
    before = (dict(small.model_options), dict(full.model_options))
    multi = nodes_mod.MultiUNetModel.execute(small, full, 0.5).result[0]
    assert (small.model_options, full.model_options) == before  # inputs untouched
    _sample(multi, "euler", steps=6)
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
    by: dict = {}
    for tag, sg in seen:
        by.setdefault(tag, []).append(sg)
    assert set(by) == {"early_cfg", "early_post", "late_post", "late_pre"}
    assert min(by["early_cfg"] + by["early_post"]) > switch
    assert max(by["late_post"] + by["late_pre"]) <= switch
    assert by["early_cfg"] == by["early_post"] and by["late_post"] == by["late_pre"]
    assert len(by["early_cfg"]) + len(by["late_post"]) == 6  # one CFG combination per euler step


def test_cfg_hooks_shared_by_both_stages_are_left_as_they_are(tm, nodes_mod):
    base = tm.build("sd15", seed=2).clone()
    base.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1).clone()
    small.model_options["sampler_post_cfg_function"] = list(base.model_options["sampler_post_cfg_function"])
    multi = nodes_mod.MultiUNetModel.execute(small, base, 0.5).result[0]
    assert multi.model_options["sampler_post_cfg_function"] == base.model_options["sampler_post_cfg_function"]
    assert "sampler_cfg_function" not in multi.model_options


def test_main_model_sampling_object_patch_is_shared(tm, nodes_mod):
    import comfy.model_sampling

    full = tm.build("sd15", seed=2)
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    ms = full.get_model_object("model_sampling")

    class Patched(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    new_ms = Patched(full.model.model_config, zsnr=True)  # what the ModelSamplingDiscrete node does
    assert not torch.equal(new_ms.sigmas, ms.sigmas)
    late = full.clone()
    late.add_object_patch("model_sampling", new_ms)
    multi = nodes_mod.MultiUNetModel.execute(small, late, 0.5).result[0]
    (key,) = [k for k in multi.additional_models if k.startswith("distilled_unets.multi_unet")]
    assert multi.additional_models[key][0].get_model_object("model_sampling") is new_ms
    assert small.get_model_object("model_sampling") is small.model.model_sampling  # input untouched
    # same UNet twice with the patch == the patched UNet alone
    twice = nodes_mod.MultiUNetModel.execute(full, late, 0.5).result[0]
    assert torch.equal(_sample(late, "dpmpp_2m"), _sample(twice, "dpmpp_2m"))


# ------------------------------------------------------------------------------------------------
# N stages


def test_three_stage_chains_route_in_order(tm, nodes_mod):
    a = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1)
    b = tm.build("sd15", seed=2)
    c = tm.build("sd15", seed=3)
    ms = c.get_model_object("model_sampling")
    s1, s2 = ms.percent_to_sigma(0.3), ms.percent_to_sigma(0.7)
    for nest in ("early", "late"):
        calls: list = []
        A, B, C = (_spy(x.clone(), calls, t) for x, t in ((a, "a"), (b, "b"), (c, "c")))
        if nest == "early":  # (A -> B @0.3) -> C @0.7
            multi = nodes_mod.MultiUNetModel.execute(nodes_mod.MultiUNetModel.execute(A, B, 0.3).result[0],
                                                     C, 0.7).result[0]
        else:  # A -> (B -> C @0.7) @0.3
            multi = nodes_mod.MultiUNetModel.execute(A, nodes_mod.MultiUNetModel.execute(B, C, 0.7).result[0],
                                                     0.3).result[0]
        _sample(multi, "dpmpp_2m", "normal", steps=10)
        tags = [t for t, _ in calls]
        assert tags == sorted(tags) and set(tags) == {"a", "b", "c"}, (nest, tags)
        for t, s in calls:
            expect = "a" if s > s1 else ("b" if s > s2 else "c")
            assert t == expect, (nest, t, s)


def test_three_stage_same_model_is_bit_identical(tm, nodes_mod):
    m = tm.build("sd15", seed=0)
    chain = nodes_mod.MultiUNetModel.execute(nodes_mod.MultiUNetModel.execute(m, m.clone(), 0.2).result[0],
                                             m.clone(), 0.6).result[0]
    assert torch.equal(_sample(m, "dpmpp_3m_sde", steps=6), _sample(chain, "dpmpp_3m_sde", steps=6))


# ------------------------------------------------------------------------------------------------
# errors before sampling, inputs untouched


def test_mismatches_raise_typed_errors(tm, nodes_mod):
    from distilled_unets.models.errors import IncompatibleModelsError
    from distilled_unets.models.patches.multi_unet import SwitchPointError

    sd15 = tm.build("sd15", seed=0)
    sd20 = tm.build("sd20", seed=0)
    xl = tm.build("sdxl", seed=0)
    vpred = tm.build("sd15", seed=0, prediction="v_prediction")
    cases = [(sd15, xl, "latent"), (xl, sd15, "latent"), (sd15, sd20, "conditioning"),
             (sd15, vpred, "predict")]
    for early, late, word in cases:
        with pytest.raises(IncompatibleModelsError) as e:
            nodes_mod.MultiUNetModel.execute(early, late, 0.4)
        msg = str(e.value)
        assert word in msg and "early_model" in msg and "late_model" in msg and "Fix:" in msg
        assert "MultiUNetModel" in msg
    with pytest.raises(IncompatibleModelsError):
        nodes_mod.MultiUNetKSampler.execute(xl, sd15, 0, 4, 2, 5.0, "euler", "karras", None, None,
                                            {"samples": tm.latent(8)}, 1.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SwitchPointError, match="switch_percent"):
            nodes_mod.MultiUNetModel.execute(sd15, sd15, bad)
    with pytest.raises(SwitchPointError, match="switch_step"):
        nodes_mod.MultiUNetKSampler.execute(sd15, sd15, 0, 4, 5, 5.0, "euler", "karras", None, None,
                                            {"samples": tm.latent(8)}, 1.0)


def test_same_unet_with_different_weight_patches_is_refused(tm, nodes_mod):
    from distilled_unets.models.errors import IncompatibleModelsError

    m = tm.build("sd15", seed=0)
    lora_like = m.clone()
    key = next(k for k in m.model.state_dict() if k.endswith("proj_in.weight"))
    lora_like.add_patches({key: ("diff", (torch.ones_like(m.model.state_dict()[key]),))}, 1.0)
    for early, late in ((lora_like, m), (m, lora_like)):
        with pytest.raises(IncompatibleModelsError, match="same loaded UNet"):
            nodes_mod.MultiUNetModel.execute(early, late, 0.5)
    # also inside a chain
    inner = nodes_mod.MultiUNetModel.execute(tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1), m, 0.3).result[0]
    with pytest.raises(IncompatibleModelsError, match="same loaded UNet"):
        nodes_mod.MultiUNetModel.execute(inner, lora_like, 0.6)
    # same patches on both: allowed, and identical to the patched UNet alone
    twice = nodes_mod.MultiUNetModel.execute(lora_like, lora_like.clone(), 0.5).result[0]
    assert torch.equal(_sample(lora_like), _sample(twice))


def _snapshot(p):
    return dict(options=copy.copy(p.model_options), to=copy.copy(p.model_options.get("transformer_options")),
                wrapper=p.model_options.get("model_function_wrapper"), add=dict(p.additional_models),
                objs=dict(p.object_patches), patches=dict(p.patches), wrappers=copy.copy(p.wrappers),
                weights={k: v.clone() for k, v in p.model.diffusion_model.state_dict().items()})


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "weights":
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert a[k] == b[k], k


def test_inputs_are_not_mutated(tm, nodes_mod):
    small = tm.build("sd15", tm.TINY_SD_TOPOLOGY, seed=1).clone()
    full = tm.build("sd15", seed=2).clone()
    full.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"], **a["c"]))
    before = _snapshot(small), _snapshot(full)
    multi = nodes_mod.MultiUNetModel.execute(small, full, 0.5).result[0]
    _sample(multi, "dpmpp_2m_sde")
    nodes_mod.MultiUNetKSampler.execute(full, small, 1, 4, 2, 5.0, "euler", "karras",
                                        *tm.conditioning("sd15"),
                                        {"samples": tm.latent(8)}, 1.0)
    _same(before[0], _snapshot(small))
    _same(before[1], _snapshot(full))
    assert multi is not full and multi.model is full.model


def test_schema_and_registration(nodes_mod):
    from distilled_unets.nodes import NODE_CLASSES

    for cls in (nodes_mod.MultiUNetModel, nodes_mod.MultiUNetKSampler):
        assert cls in NODE_CLASSES
        s = cls.define_schema()
        assert s.category == "distilled_unets/sampling" and s.description
        assert all(i.tooltip for i in s.inputs)
    ids = [i.id for i in nodes_mod.MultiUNetKSampler.define_schema().inputs]
    assert ids[:5] == ["model", "early_model", "seed", "steps", "switch_step"]


@pytest.mark.parametrize("name", ["multi_unet_sd15.json", "multi_unet_sdxl.json"])
def test_example_workflows_match_the_node_schemas(name):
    import comfy.samplers
    from _workflows import check_pack_nodes, load

    wf = load(name)
    types = {n["type"] for n in wf["nodes"]}
    assert "MarkdownNote" in types and ({"MultiUNetModel", "MultiUNetKSampler"} & types)
    check_pack_nodes(wf)
    for n in wf["nodes"]:
        if n["type"] == "MultiUNetKSampler":
            seed, _, steps, k, cfg, sampler, sched, denoise = n["widgets_values"]
            assert sampler in comfy.samplers.KSampler.SAMPLERS and sched in comfy.samplers.KSampler.SCHEDULERS
            assert 0 <= k <= steps
