"""Unit tests for models/patches/multi_unet.py (no ComfyUI): switch sigmas, stage selection, compatibility
checks and the router's call routing with small fakes of ModelPatcher / BaseModel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from distilled_unets.models.errors import IncompatibleModelsError, PackError
from distilled_unets.models.patches.multi_unet import (
    STAGE_PATCHER,
    LateStageWrapper,
    LoadedStage,
    MultiUNetRouter,
    SwitchPoint,
    SwitchPointError,
    UNetSignature,
    check_compatible,
    check_shared_weights,
    check_switch_percent,
    check_switch_step,
    install_router,
    stage_for_sigma,
    stage_transformer_options,
    steps_per_stage,
    switch_sigma_from_percent,
    switch_sigma_from_step,
)

SIGMAS = [14.6, 7.0, 3.1, 1.2, 0.4, 0.03, 0.0]


class FakeSampling:
    """percent_to_sigma like ComfyUI's ModelSamplingDiscrete: log-linear between 14.6 and 0.03."""

    def percent_to_sigma(self, p):
        return math.exp(math.log(14.6) + (math.log(0.03) - math.log(14.6)) * p)


def test_switch_sigma_from_percent_edges_and_model_sampling():
    ms = FakeSampling()
    assert switch_sigma_from_percent(ms, 0.0) == math.inf
    assert switch_sigma_from_percent(ms, 1.0) == 0.0
    assert switch_sigma_from_percent(ms, 0.5) == pytest.approx(ms.percent_to_sigma(0.5))
    for bad in (-0.01, 1.01, float("nan"), "x", None):
        with pytest.raises(SwitchPointError) as e:
            switch_sigma_from_percent(ms, bad)
        assert isinstance(e.value, IncompatibleModelsError) and "Fix:" in str(e.value)


def test_switch_sigma_from_step_sits_between_neighbours():
    n = len(SIGMAS) - 1
    for k in range(1, n):
        t = switch_sigma_from_step(SIGMAS, k)
        assert SIGMAS[k] < t < SIGMAS[k - 1], k
        assert steps_per_stage(SIGMAS, [t]) == [k, n - k]
        # step k's own sigma runs late, step k-1's runs early
        assert stage_for_sigma(SIGMAS[k], [t]) == 1 and stage_for_sigma(SIGMAS[k - 1], [t]) == 0
        # intermediate sigmas of step k-1 (midpoint in log space) run early
        mid = math.sqrt(SIGMAS[k - 1] * SIGMAS[k]) if SIGMAS[k] > 0 else SIGMAS[k - 1] / 2
        assert stage_for_sigma(mid, [t]) == 0
    assert switch_sigma_from_step(SIGMAS, 0) == math.inf
    assert steps_per_stage(SIGMAS, [switch_sigma_from_step(SIGMAS, n)]) == [n, 0]
    assert steps_per_stage(SIGMAS, [switch_sigma_from_step(SIGMAS, n + 5)]) == [n, 0]
    # a schedule that does not end at 0 (KSamplerAdvanced leftover noise)
    tail = [5.0, 2.0, 1.0]
    assert steps_per_stage(tail, [switch_sigma_from_step(tail, 2)]) == [2, 0]
    assert stage_for_sigma(1.0, [switch_sigma_from_step(tail, 2)]) == 0  # all steps early


def test_switch_step_and_percent_checks():
    assert check_switch_step(0, 25) == 0 and check_switch_step(25, 25) == 25
    for bad in (-1, 26, 2.5, True):
        with pytest.raises(SwitchPointError, match="switch_step"):
            check_switch_step(bad, 25)
    assert check_switch_percent(0.4) == 0.4


def test_stage_for_sigma_n_stages():
    th = [5.0, 1.0, 0.1]
    assert [stage_for_sigma(s, th) for s in (14.0, 5.0, 4.9, 1.0, 0.5, 0.1, 0.05)] == [0, 1, 1, 2, 2, 3, 3]
    assert steps_per_stage(SIGMAS, th) == [2, 2, 1, 1]


def _sig(**kw):
    base = dict(name="x", latent_format="SD15", latent_channels=4, context_dim=768, adm_channels=None,
                prediction="eps", in_channels=4)
    base.update(kw)
    return UNetSignature(**base)


@pytest.mark.parametrize("field,value,word", [
    ("latent_format", "SDXL", "latent"), ("latent_channels", 16, "latent"),
    ("context_dim", 2048, "conditioning"), ("adm_channels", 2816, "pooled"),
    ("prediction", "v_prediction", "predict"), ("in_channels", 9, "inpainting"),
])
def test_check_compatible_names_both_models_and_fix(field, value, word):
    early = _sig(name="early_model (tiny)")
    late = _sig(name="late_model (full)", **{field: value})
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(early, late, node="MultiUNetModel")
    msg = str(e.value)
    assert word in msg and "early_model (tiny)" in msg and "late_model (full)" in msg
    assert "MultiUNetModel" in msg and "Fix:" in msg
    check_compatible(early, _sig(name="late"))  # same family: fine


def test_check_shared_weights():
    check_shared_weights([LoadedStage("a", 1, "w"), LoadedStage("b", 1, "w"), LoadedStage("c", 2, "z")])
    with pytest.raises(IncompatibleModelsError, match="same loaded UNet"):
        check_shared_weights([LoadedStage("a", 1, "w"), LoadedStage("b", 2, "v"),
                              LoadedStage("c", 1, "lora")])


# ------------------------------------------------------------------------------------------------
# router with fakes: ComfyUI's keyed-wrapper executor, ModelPatcher and BaseModel, reduced to what the
# router touches


APPLY = "apply_model"  # what the node passes (ComfyUI's WrappersMP.APPLY_MODEL)


class FakeExecutor:
    """ComfyUI's WrapperExecutor around BaseModel._apply_model: wrappers in order, then the original."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return FakeExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


class FakeBase:
    """BaseModel: apply_model runs the APPLY_MODEL wrappers found in transformer_options."""

    def __init__(self, tag, log):
        self.tag, self.log, self.current_patcher = tag, log, None

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get(APPLY, {}).values() for w in ws]
        return FakeExecutor(self._apply_model, self, wrappers).execute(x, t, c_concat, c_crossattn, control,
                                                                        transformer_options, **kw)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        self.log.append((self.tag, float(t[0]), dict(kw, c_crossattn=c_crossattn, control=control,
                                                      transformer_options=transformer_options)))
        return x + (1.0 if self.tag in ("early", "a") else 2.0)


class FakePatcher:
    def __init__(self, base, options=None):
        self.model = base
        self.model_options = options or {"transformer_options": {}}
        self.wrappers, self.callbacks, self.additional_models = {}, {}, {}

    def get_additional_models_with_key(self, key):
        return self.additional_models.get(key, [])

    def set_additional_models(self, key, models):
        self.additional_models[key] = models

    def add_wrapper_with_key(self, wtype, key, fn):
        self.wrappers.setdefault(wtype, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, wtype, key):
        self.wrappers.get(wtype, {}).pop(key, None)


def _setup(switch, *, early_options=None, late_mfw=None):
    log: list = []
    early = FakePatcher(FakeBase("early", log), early_options)
    late_base = FakeBase("late", log)
    main = FakePatcher(late_base, {"transformer_options": {"patches": {"attn1_patch": ["main"]},
                                                           "main_only": 1}})
    if late_mfw is not None:
        main.model_options["model_function_wrapper"] = late_mfw
    router = MultiUNetRouter(switch)
    install_router(main, router, early, apply_model_type=APPLY)
    late_base.current_patcher = main  # what ComfyUI's pre_run does
    return router, main, early, log


def _to(main, sigma, sample_sigmas=None):
    """transformer_options as ComfyUI's calc_cond_batch builds them for the sampled patcher."""
    to = {"patches": {"attn1_patch": ["main"]}, "main_only": 1, "cond_or_uncond": [0, 1], "uuids": ["u", "v"],
          "sigmas": torch.tensor([sigma] * 2), "sample_sigmas": sample_sigmas, "from_hook": "h"}
    to["wrappers"] = {k: {kk: list(v) for kk, v in d.items()} for k, d in main.wrappers.items()}
    return to


def _call(main, sigma, sample_sigmas=None):
    """What ComfyUI's sampler does for one batch: the model_function_wrapper slot, else apply_model."""
    x, t = torch.zeros(2, 4, 2, 2), torch.tensor([sigma] * 2)
    c = {"c_crossattn": "ctx", "control": "cnet", "transformer_options": _to(main, sigma, sample_sigmas)}
    mfw = main.model_options.get("model_function_wrapper")
    if mfw is not None:
        return mfw(main.model.apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": [0, 1]})
    return main.model.apply_model(x, t, **c)


def test_router_routes_by_sigma_and_rebuilds_options_for_early():
    early_opts = {"transformer_options": {"patches": {"attn1_patch": ["early"]}}}
    router, main, early, log = _setup(SwitchPoint("sigma", 2.0), early_options=early_opts)
    early.wrappers = {"diffusion_model": {"spy": ["early_wrapper"]}}
    assert main.wrappers[APPLY] == {router.key: [router]} and "model_function_wrapper" not in main.model_options
    out = _call(main, 7.0)
    assert torch.equal(out, torch.ones(2, 4, 2, 2))
    tag, sigma, c = log[-1]
    assert tag == "early" and sigma == 7.0
    assert c["control"] is None and c["c_crossattn"] == "ctx"
    to = c["transformer_options"]
    assert to["patches"] == {"attn1_patch": ["early"]}
    assert to["wrappers"] == {"diffusion_model": {"spy": ["early_wrapper"]}}
    assert "main_only" not in to and to["from_hook"] == "h"
    assert to["cond_or_uncond"] == [0, 1] and to["uuids"] == ["u", "v"] and to[STAGE_PATCHER] is early
    assert early.model_options == early_opts  # not written to
    _call(main, 2.0)  # at the switch sigma: late
    tag, sigma, c = log[-1]
    assert tag == "late" and c["control"] == "cnet" and c["transformer_options"]["main_only"] == 1


def test_router_step_switch_uses_sample_sigmas_and_caches():
    router, main, _, log = _setup(SwitchPoint.from_step(2))
    sig = torch.tensor(SIGMAS)
    for s in SIGMAS[:-1]:
        _call(main, s, sig)
    assert [t for t, _, _ in log] == ["early"] * 2 + ["late"] * 4
    assert router._cache[sig.device][0] is sig
    with pytest.raises(PackError, match="switch_step"):
        MultiUNetRouter(SwitchPoint.from_step(2)).threshold(None)


def test_late_model_function_wrapper_runs_only_in_late_stage_and_keeps_its_hooks():
    seen = []

    class Previous:
        def __call__(self, apply_model, args):
            seen.append(float(args["timestep"][0]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        def to(self, device):
            seen.append(("to", device))
            return self

        def models(self):
            return ["extra model"]

    router, main, _, log = _setup(SwitchPoint("sigma", 2.0), late_mfw=Previous())
    gate = main.model_options["model_function_wrapper"]
    assert isinstance(gate, LateStageWrapper)
    for s in (7.0, 3.0, 1.0, 0.5):
        _call(main, s)
    assert seen == [1.0, 0.5]
    assert [t for t, _, _ in log] == ["early", "early", "late", "late"]
    assert gate.to("cuda") is gate and seen[-1] == ("to", "cuda") and gate.models() == ["extra model"]
    assert copy.deepcopy({"w": gate})["w"] is gate


def test_a_later_model_function_wrapper_without_chaining_keeps_the_routing():
    router, main, _, log = _setup(SwitchPoint("sigma", 2.0))
    later = []

    def overwrite(apply_model, args):  # another pack's wrapper that does not chain the slot
        later.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    main.model_options["model_function_wrapper"] = overwrite
    for s in (7.0, 3.0, 1.0):
        _call(main, s)
    assert later == [7.0, 3.0, 1.0]
    assert [t for t, _, _ in log] == ["early", "early", "late"]


def test_router_is_the_outermost_apply_model_wrapper():
    """The late UNet's own apply-model wrappers (on the patcher and in model_options) move inside the
    router, so they run only in the late steps; other wrapper types are left alone."""
    seen = []

    def spy(tag):
        def w(executor, *args, **kwargs):
            seen.append((tag, float(args[1][0])))
            return executor(*args, **kwargs)
        return w

    log: list = []
    late_base = FakeBase("late", log)
    main = FakePatcher(late_base, {"transformer_options": {"wrappers": {APPLY: {"opt": [spy("late_opt")]}}}})
    main.add_wrapper_with_key(APPLY, "torch.compile", spy("late_compile"))
    main.add_wrapper_with_key("diffusion_model", "other", "kept")
    router = MultiUNetRouter(SwitchPoint("sigma", 2.0))
    install_router(main, router, FakePatcher(FakeBase("early", log)), apply_model_type=APPLY)
    assert list(main.wrappers[APPLY]) == [router.key, "torch.compile", "opt"]
    assert main.wrappers["diffusion_model"] == {"other": ["kept"]}
    assert APPLY not in main.model_options["transformer_options"]["wrappers"]
    late_base.current_patcher = main
    for s in (7.0, 1.0):
        _call(main, s)
    assert seen == [("late_compile", 1.0), ("late_opt", 1.0)]
    assert [t for t, _, _ in log] == ["early", "late"]


def test_nested_routers_give_three_stages():
    """(a -> b) -> c and a -> (b -> c): a nested stage's router finds its patcher through STAGE_PATCHER."""
    for nest in ("early", "late"):
        log: list = []
        a, b, c = (FakeBase(t, log) for t in ("a", "b", "c"))
        if nest == "early":
            inner = FakePatcher(b)
            install_router(inner, MultiUNetRouter(SwitchPoint("sigma", 5.0)), FakePatcher(a), apply_model_type=APPLY)
            main = FakePatcher(c)
            install_router(main, MultiUNetRouter(SwitchPoint("sigma", 1.0)), inner, apply_model_type=APPLY)
        else:
            main = FakePatcher(c)
            install_router(main, MultiUNetRouter(SwitchPoint("sigma", 1.0)), FakePatcher(b), apply_model_type=APPLY)
            install_router(main, MultiUNetRouter(SwitchPoint("sigma", 5.0)), FakePatcher(a), apply_model_type=APPLY)
        c.current_patcher = main
        for s in (14.0, 5.0, 2.0, 1.0, 0.1):
            _call(main, s)
        assert [t for t, _, _ in log] == ["a", "b", "b", "c", "c"], nest


def test_router_survives_deepcopy_and_reports_missing_early():
    router, main, _, _ = _setup(SwitchPoint("sigma", 2.0))
    assert copy.deepcopy({"w": router})["w"] is router
    main.additional_models.clear()
    with pytest.raises(PackError, match="early UNet"):
        _call(main, 9.0)
    main.model.current_patcher = None  # run outside a sampler (no pre_run): the same typed error
    with pytest.raises(PackError, match="early UNet"):
        _call(main, 9.0)


def test_stage_transformer_options_keeps_runtime_keys_only():
    p = FakePatcher(None, {"transformer_options": {"patches_replace": {"attn1": {"x": 1}}}})
    runtime = {"patches": 1, "patches_replace": 2, "optimized_attention_override": 3, "sigmas": 4,
               "sample_sigmas": 5, "main_cfg": 6, "extra": 7}
    out = stage_transformer_options(p, runtime, {"main_cfg": 0, "sigmas": 0})
    assert out["patches_replace"] == {"attn1": {"x": 1}}
    assert out["sigmas"] == 4 and out["sample_sigmas"] == 5 and out["extra"] == 7
    assert "patches" not in out and "optimized_attention_override" not in out and "main_cfg" not in out
