"""Unit tests for models/multi_unet.py (no ComfyUI): switch sigmas, stage selection, compatibility
checks and the router's call routing with small fakes of ModelPatcher / BaseModel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from distilled_unets.models.errors import IncompatibleModelsError, PackError
from distilled_unets.models.multi_unet import (
    LoadedStage,
    MultiUNetRouter,
    SwitchPoint,
    SwitchPointError,
    UNetSignature,
    check_compatible,
    check_shared_weights,
    check_switch_percent,
    check_switch_step,
    split_for_steps,
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


def test_switch_step_checks_and_split():
    assert check_switch_step(0, 25) == 0 and check_switch_step(25, 25) == 25
    for bad in (-1, 26, 2.5, True):
        with pytest.raises(SwitchPointError, match="switch_step"):
            check_switch_step(bad, 25)
    assert check_switch_percent(0.4) == 0.4
    assert split_for_steps(25, 10) == (10, 15)
    assert split_for_steps(20, 30) == (20, 0)


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
# router with fakes


class FakeBase:
    def __init__(self, tag, log):
        self.tag, self.log, self.current_patcher = tag, log, None

    def apply_model(self, x, t, **c):
        self.log.append((self.tag, float(t[0]), c))
        return x + (1.0 if self.tag == "early" else 2.0)


class FakePatcher:
    def __init__(self, base, options=None):
        self.model = base
        self.model_options = options or {"transformer_options": {}}
        self.wrappers, self.callbacks, self.additional_models = {}, {}, {}

    def get_additional_models_with_key(self, key):
        return self.additional_models.get(key, [])


def _setup(switch, *, previous=None, early_options=None):
    log: list = []
    early = FakePatcher(FakeBase("early", log), early_options)
    late_base = FakeBase("late", log)
    main = FakePatcher(late_base, {"transformer_options": {"patches": {"attn1_patch": ["main"]},
                                                           "main_only": 1}})
    router = MultiUNetRouter(switch, previous=previous)
    main.additional_models[router.key] = [early]
    main.model_options["model_function_wrapper"] = router
    late_base.current_patcher = main
    return router, main, early, log


def _args(sigma, sample_sigmas=None):
    to = {"patches": {"attn1_patch": ["main"]}, "wrappers": {"apply_model": {"k": ["main_wrapper"]}},
          "main_only": 1, "cond_or_uncond": [0, 1], "uuids": ["u", "v"], "sigmas": torch.tensor([sigma] * 2),
          "sample_sigmas": sample_sigmas, "from_hook": "h"}
    return {"input": torch.zeros(2, 4, 2, 2), "timestep": torch.tensor([sigma] * 2),
            "c": {"c_crossattn": "ctx", "control": "cnet", "transformer_options": to},
            "cond_or_uncond": [0, 1]}


def test_router_routes_by_sigma_and_rebuilds_options_for_early():
    early_opts = {"transformer_options": {"patches": {"attn1_patch": ["early"]}}}
    router, main, early, log = _setup(SwitchPoint("sigma", 2.0), early_options=early_opts)
    early.wrappers = {"diffusion_model": {"spy": ["early_wrapper"]}}
    out = router(main.model.apply_model, _args(7.0))
    assert torch.equal(out, torch.ones(2, 4, 2, 2))
    tag, sigma, c = log[-1]
    assert tag == "early" and sigma == 7.0
    assert "control" not in c and c["c_crossattn"] == "ctx"
    to = c["transformer_options"]
    assert to["patches"] == {"attn1_patch": ["early"]}
    assert to["wrappers"] == {"diffusion_model": {"spy": ["early_wrapper"]}}
    assert "main_only" not in to and to["from_hook"] == "h"
    assert to["cond_or_uncond"] == [0, 1] and to["uuids"] == ["u", "v"]
    assert early.model_options == early_opts  # not written to
    router(main.model.apply_model, _args(2.0))  # at the switch sigma: late
    tag, sigma, c = log[-1]
    assert tag == "late" and c["control"] == "cnet" and c["transformer_options"]["main_only"] == 1


def test_router_step_switch_uses_sample_sigmas_and_caches():
    router, main, _, log = _setup(SwitchPoint.from_step(2))
    sig = torch.tensor(SIGMAS)
    for s in SIGMAS[:-1]:
        router(main.model.apply_model, _args(s, sig))
    assert [t for t, _, _ in log] == ["early"] * 2 + ["late"] * 4
    assert router._cache_sigmas is sig
    with pytest.raises(PackError, match="switch_step"):
        MultiUNetRouter(SwitchPoint.from_step(2)).threshold(None)


def test_router_chains_previous_wrapper_only_in_late_stage():
    seen = []

    def previous(apply_model, args):
        seen.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    router, main, _, log = _setup(SwitchPoint("sigma", 2.0), previous=previous)
    for s in (7.0, 3.0, 1.0, 0.5):
        router(main.model.apply_model, _args(s))
    assert seen == [1.0, 0.5]
    assert [t for t, _, _ in log] == ["early", "early", "late", "late"]


def test_nested_routers_give_three_stages():
    log: list = []
    a, b, c = (FakeBase(t, log) for t in ("a", "b", "c"))
    inner = MultiUNetRouter(SwitchPoint("sigma", 5.0))  # a -> b
    inner_patcher = FakePatcher(b, {"transformer_options": {}, "model_function_wrapper": inner})
    inner_patcher.additional_models[inner.key] = [FakePatcher(a)]
    outer = MultiUNetRouter(SwitchPoint("sigma", 1.0))  # (a -> b) -> c
    main = FakePatcher(c, {"transformer_options": {}, "model_function_wrapper": outer})
    main.additional_models[outer.key] = [inner_patcher]
    c.current_patcher = main
    for s in (14.0, 5.0, 2.0, 1.0, 0.1):
        outer(c.apply_model, _args(s))
    assert [t for t, _, _ in log] == ["a", "b", "b", "c", "c"]


def test_router_survives_deepcopy_and_reports_missing_early():
    router, main, _, _ = _setup(SwitchPoint("sigma", 2.0))
    assert copy.deepcopy({"w": router})["w"] is router
    main.additional_models.clear()
    with pytest.raises(PackError, match="early UNet"):
        router(main.model.apply_model, _args(9.0))


def test_stage_transformer_options_keeps_runtime_keys_only():
    p = FakePatcher(None, {"transformer_options": {"patches_replace": {"attn1": {"x": 1}}}})
    runtime = {"patches": 1, "patches_replace": 2, "optimized_attention_override": 3, "sigmas": 4,
               "sample_sigmas": 5, "main_cfg": 6, "extra": 7}
    out = stage_transformer_options(p, runtime, {"main_cfg": 0, "sigmas": 0})
    assert out["patches_replace"] == {"attn1": {"x": 1}}
    assert out["sigmas"] == 4 and out["sample_sigmas"] == 5 and out["extra"] == 7
    assert "patches" not in out and "optimized_attention_override" not in out and "main_cfg" not in out
