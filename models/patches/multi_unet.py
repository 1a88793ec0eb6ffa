"""Multi-UNet sampling (A-SDM §2.4): route every model call of ONE sampler run to a UNet by its sigma.

A small UNet draws the prototype in the high-noise steps, the full UNet refines in the low-noise
ones. The sampler never restarts, so multistep history and SDE/ancestral noise stay continuous.

Everything here is host-free: the router talks to ComfyUI's ``ModelPatcher`` / ``BaseModel`` only
through duck-typed attributes (``model_options``, ``wrappers``, ``callbacks``, ``add_wrapper_with_key``,
``get_additional_models_with_key``, ``model.apply_model``, ``current_patcher``), never imports them; the
wrapper-type name (ComfyUI's ``WrappersMP.APPLY_MODEL``) is passed in by the node.

Where it sits: a KEYED apply-model wrapper of the routing MODEL (``install_router``), the outermost one,
so it runs inside ``BaseModel.apply_model`` whatever occupies the single ``model_function_wrapper`` slot
(a later node may overwrite that slot without chaining), on the sampled patcher and on each multi-GPU
device clone alike. The late UNet's own model_function_wrapper and apply-model wrappers run only in the
late steps; the early UNet runs with its own.

Routing rule: a call at sigma ``s`` runs on the early UNet when ``s > switch_sigma``, else on the
late one. ``switch_sigma`` comes from

* a percent ``p`` of the schedule (ComfyUI's convention, via ``model_sampling.percent_to_sigma``):
  ``p = 0`` puts nothing on the early UNet, ``p = 1`` everything;
* a step index ``k`` (``MultiUNetKSampler``): steps ``0 .. k-1`` on the early UNet, ``k ..`` on the
  late one. The threshold sits between ``sigmas[k-1]`` and ``sigmas[k]`` of the schedule actually
  sampled (``transformer_options["sample_sigmas"]``), just above ``sigmas[k]``: every evaluation of
  step ``k-1`` (including the intermediate sigmas of dpm_2 / dpmpp_2s / dpmpp_sde) runs early; the
  end-point evaluation of Heun-type correctors (exactly at ``sigmas[k]``) already runs late.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import IncompatibleModelsError, PackError

log = logging.getLogger("distilled_unets")

KEY_PREFIX = "distilled_unets.multi_unet"
EARLY, LATE = 0, 1
# Part of the log-gap between sigmas[k] and sigmas[k-1] that the step threshold sits above sigmas[k].
STEP_MARGIN = 0.01
# transformer_options keys that belong to the model being sampled (its patches, wrappers, attention
# override); they are never handed to another UNet.
MODEL_OWN_KEYS = frozenset({"patches", "patches_replace", "wrappers", "callbacks",
                            "optimized_attention_override"})
RUNTIME_KEYS = ("cond_or_uncond", "uuids", "sigmas", "sample_sigmas")
# transformer_options key naming the patcher of a stage that is not the sampled one, for the routers
# among that stage's own wrappers (nested multi-UNet MODELs)
STAGE_PATCHER = "distilled_unets.stage_patcher"


class SwitchPointError(IncompatibleModelsError):
    """The switch point is not a percent in [0, 1] / not a step index of the schedule."""


# ------------------------------------------------------------------------------------------------
# switch sigma


def check_switch_percent(percent: float, *, node: str = "MultiUNetModel",
                         input_name: str = "switch_percent") -> float:
    """Return ``percent`` as a float, or raise ``SwitchPointError`` when it is outside [0, 1]."""
    try:
        p = float(percent)
    except (TypeError, ValueError):
        p = float("nan")
    if not (0.0 <= p <= 1.0):
        raise SwitchPointError(
            f"switch point {percent!r} is not a fraction of the denoising schedule",
            "use a value between 0.0 (late UNet for every step) and 1.0 (early UNet for every step); "
            "A-SDM's best split is 0.4 (small UNet for the first 10 of 25 steps)",
            node=node, input_name=input_name)
    return p


def check_switch_step(step: int, steps: int, *, node: str = "MultiUNetKSampler",
                      input_name: str = "switch_step") -> int:
    """Return ``step`` as an int, or raise ``SwitchPointError`` when it is not in [0, steps]."""
    if isinstance(step, bool) or not isinstance(step, int) or not (0 <= step <= int(steps)):
        raise SwitchPointError(
            f"switch step {step!r} is not a step of a {steps}-step schedule",
            f"use 0..{steps}: the early UNet runs steps 0..switch_step-1, the late UNet the rest",
            node=node, input_name=input_name)
    return step


def switch_sigma_from_percent(model_sampling: Any, percent: float) -> float:
    """Switch sigma for a percent of the schedule, through the model's own ``percent_to_sigma``."""
    p = check_switch_percent(percent)
    if p <= 0.0:
        return math.inf
    if p >= 1.0:
        return 0.0
    return float(model_sampling.percent_to_sigma(p))


def switch_sigma_from_step(sigmas: Sequence[float], step: int) -> float:
    """Threshold between ``sigmas[step-1]`` and ``sigmas[step]``: steps before ``step`` run early.

    ``step <= 0`` → ``inf`` (nothing early); ``step >= len(sigmas) - 1`` → every step early.
    """
    s = [float(x) for x in sigmas]
    n = len(s) - 1
    if step <= 0 or n <= 0:
        return math.inf
    if step >= n:
        return 0.0 if s[n] <= 0 else s[n] * (1.0 - 1e-6)
    hi, lo = s[step - 1], s[step]
    if lo <= 0.0:
        return 0.0
    if hi <= lo:  # flat or rising schedule: no gap to sit in
        return lo
    return lo * math.exp(STEP_MARGIN * math.log(hi / lo))


def stage_for_sigma(sigma: float, thresholds: Sequence[float]) -> int:
    """Stage index for ``sigma`` in an N-stage chain with descending switch sigmas.

    ``thresholds[i]`` is the switch sigma between stage ``i`` and stage ``i+1``: stage 0 runs while
    ``sigma > thresholds[0]``, the last stage once ``sigma <= thresholds[-1]``.
    """
    for i, t in enumerate(thresholds):
        if sigma > t:
            return i
    return len(thresholds)


def steps_per_stage(sigmas: Sequence[float], thresholds: Sequence[float]) -> list[int]:
    """How many steps (counted by the sigma each step starts at) each stage runs."""
    counts = [0] * (len(thresholds) + 1)
    for s in list(sigmas)[:-1]:
        counts[stage_for_sigma(float(s), thresholds)] += 1
    return counts


# ------------------------------------------------------------------------------------------------
# compatibility


@dataclass(frozen=True)
class UNetSignature:
    """What two UNets must share to take turns inside one sampler run."""
    name: str                 # for messages, e.g. "early_model (SD15 UNet, 323M params)"
    latent_format: str        # latent space (SD15, SDXL, ...)
    latent_channels: int
    context_dim: int | None   # cross-attention (text conditioning) width
    adm_channels: int | None  # pooled/size conditioning width (SDXL 2816), None without
    prediction: str           # eps, v_prediction, ...
    in_channels: int = 4      # 9 for inpainting UNets (concat conditioning)


def check_compatible(early: UNetSignature, late: UNetSignature, *, node: str = "MultiUNetModel") -> None:
    """Raise ``IncompatibleModelsError`` naming both models and the fix when they cannot be mixed."""
    pair = f"{early.name} and {late.name}"
    same_family = ("pair UNets of one family: an SD1.5 student (BK-SDM, small-sd, tiny-sd) with an SD1.5 "
                   "model, an SD2.x student with SD2.x, SSD-1B / Vega / KOALA with SDXL")
    if early.latent_format != late.latent_format or early.latent_channels != late.latent_channels:
        raise IncompatibleModelsError(
            f"{pair} work in different latent spaces ({early.latent_format}, {early.latent_channels} ch "
            f"vs {late.latent_format}, {late.latent_channels} ch)", same_family, node=node,
            input_name="early_model")
    if early.context_dim != late.context_dim:
        raise IncompatibleModelsError(
            f"{pair} take text conditioning of different widths ({early.context_dim} vs "
            f"{late.context_dim}); one prompt encoding cannot drive both", same_family, node=node,
            input_name="early_model")
    if (early.adm_channels or 0) != (late.adm_channels or 0):
        raise IncompatibleModelsError(
            f"{pair} take different pooled/size conditioning (adm {early.adm_channels} vs "
            f"{late.adm_channels})", same_family, node=node, input_name="early_model")
    if early.in_channels != late.in_channels:
        raise IncompatibleModelsError(
            f"{pair} take different input channels ({early.in_channels} vs {late.in_channels}); an "
            "inpainting UNet cannot share a run with a plain one",
            "pair two inpainting UNets or two plain ones", node=node, input_name="early_model")
    if early.prediction != late.prediction:
        raise IncompatibleModelsError(
            f"{pair} predict different targets ({early.prediction} vs {late.prediction})",
            "set the early model's prediction type to match (DistilledUNetLoader 'prediction', or a "
            "ModelSamplingDiscrete node on it), or pick a late model of the same prediction type",
            node=node, input_name="early_model")


@dataclass(frozen=True)
class LoadedStage:
    """One leaf UNet of a chain, for the shared-weights check."""
    name: str
    model_id: int        # id() of the underlying BaseModel
    weights: Any         # anything that is equal iff the weight/object patches are the same


def check_shared_weights(stages: Sequence[LoadedStage], *, node: str = "MultiUNetModel") -> None:
    """Two patchers of ONE BaseModel with different patches cannot both be loaded (ComfyUI patches
    weights in place on the shared module), so refuse that pairing with the fix."""
    seen: dict[int, LoadedStage] = {}
    for st in stages:
        other = seen.get(st.model_id)
        if other is None:
            seen[st.model_id] = st
        elif other.weights != st.weights:
            raise IncompatibleModelsError(
                f"{other.name} and {st.name} are the same loaded UNet with different patches (e.g. a "
                "LoRA on only one of them); ComfyUI patches the weights in place, so both cannot be "
                "loaded at once", "load the UNet a second time (its own loader node) for the branch "
                "that gets the LoRA, or put the same patches on both", node=node, input_name="early_model")


# ------------------------------------------------------------------------------------------------
# switch point and router


@dataclass(frozen=True)
class SwitchPoint:
    """Either a fixed switch sigma (from a percent) or a step index resolved per run."""
    kind: str            # "sigma" or "step"
    value: float         # the sigma, or the step index

    @classmethod
    def from_percent(cls, model_sampling: Any, percent: float) -> "SwitchPoint":
        return cls("sigma", switch_sigma_from_percent(model_sampling, percent))

    @classmethod
    def from_step(cls, step: int) -> "SwitchPoint":
        return cls("step", int(step))

    def threshold(self, sample_sigmas: Sequence[float] | None) -> float:
        if self.kind == "sigma":
            return self.value
        if sample_sigmas is None:
            raise PackError("the switch step needs the sampled schedule, which this run does not pass",
                            "sample with a ComfyUI sampler node (KSampler, SamplerCustomAdvanced, ...)",
                            node="MultiUNetKSampler", input_name="switch_step")
        return switch_sigma_from_step(sample_sigmas, int(self.value))


def _merge_wrapper_dicts(*dicts: dict) -> dict:
    """{type: {key: [fn, ...]}} merge with list concatenation (fresh containers, inputs untouched)."""
    out: dict = {}
    for d in dicts:
        for wtype, by_key in (d or {}).items():
            slot = out.setdefault(wtype, {})
            for key, fns in by_key.items():
                slot[key] = slot.get(key, []) + list(fns)
    return out


def stage_transformer_options(patcher: Any, runtime: dict, main_static: dict | None = None) -> dict:
    """transformer_options for a UNet that is not the one being sampled.

    Starts from the UNet's OWN ``model_options["transformer_options"]`` (its patches, replaces,
    attention override) plus its own wrappers and callbacks, then adds the per-call runtime keys of
    the sampled model's options (cond_or_uncond, uuids, sigmas, sample_sigmas, and any other key a
    sampler-level hook put there). The main model's patches/wrappers never leak in. ``STAGE_PATCHER``
    names ``patcher`` for the routers among its own wrappers (a nested multi-UNet stage).
    """
    own = dict(patcher.model_options.get("transformer_options", {}))
    own["wrappers"] = _merge_wrapper_dicts(own.get("wrappers"), getattr(patcher, "wrappers", None))
    own["callbacks"] = _merge_wrapper_dicts(own.get("callbacks"), getattr(patcher, "callbacks", None))
    static = main_static or {}
    for k, v in runtime.items():
        if k in MODEL_OWN_KEYS:
            continue
        if k in RUNTIME_KEYS or k not in static:
            own[k] = v
    own[STAGE_PATCHER] = patcher
    return own


def call_patcher_model(patcher: Any, args: dict) -> Any:
    """Run ``patcher``'s UNet on ``args`` ({input, timestep, c, cond_or_uncond}) as its own sampler would:
    through its own ``model_function_wrapper`` if it has one, then its BaseModel's ``apply_model`` (whose
    apply-model wrappers come from ``c["transformer_options"]``: a nested router routes further)."""
    wrapper = patcher.model_options.get("model_function_wrapper")
    if wrapper is not None:
        return wrapper(patcher.model.apply_model, args)
    return patcher.model.apply_model(args["input"], args["timestep"], **args["c"])


def stage_patchers(patcher: Any, label: str = "model") -> list[tuple[str, Any]]:
    """(label, patcher) for every UNet a (possibly nested) multi-UNet MODEL runs: the MODEL itself (the
    late UNet), then each early stage registered under this module's additional-model key."""
    out = [(label, patcher)]
    for key, models in getattr(patcher, "additional_models", {}).items():
        if key.startswith(KEY_PREFIX):
            for i, m in enumerate(models):
                out += stage_patchers(m, f"{label} > early stage" + (f" {i}" if len(models) > 1 else ""))
    return out


_APPLY_MODEL_PARAMS = ("c_concat", "c_crossattn", "control", "transformer_options")


def split_apply_args(args: tuple, kwargs: dict) -> tuple[Any, Any, dict]:
    """(x, t, c) from the arguments of ``BaseModel.apply_model(x, t, c_concat, c_crossattn, control,
    transformer_options, **kwargs)``, however a wrapper before ours passed them on."""
    c = dict(kwargs)
    x, t = (args[0], args[1]) if len(args) >= 2 else (args[0] if args else c.pop("x"), c.pop("t"))
    for name, value in zip(_APPLY_MODEL_PARAMS, args[2:]):
        c[name] = value
    if c.get("transformer_options") is None:
        c["transformer_options"] = {}
    return x, t, c


def _continue(executor: Callable, x: Any, t: Any, c: dict) -> Any:
    """Call the rest of the apply-model wrapper chain with ``apply_model``'s own positional layout."""
    rest = dict(c)
    head = [rest.pop(name, None) for name in _APPLY_MODEL_PARAMS]
    if head[3] is None:
        head[3] = {}
    return executor(x, t, *head, **rest)


class MultiUNetRouter:
    """Keyed apply-model wrapper of the routing MODEL (a clone of the late UNet) under ``self.key``.

    ComfyUI calls it inside ``BaseModel.apply_model`` as ``router(executor, x, t, c_concat, c_crossattn,
    control, transformer_options, **kwargs)``, whatever sits in the single ``model_function_wrapper``
    slot (another node may overwrite that slot without chaining: the routing survives).

    Late stage: ``executor`` (the rest of the chain: the late UNet's own apply-model wrappers, which
    ``install_router`` puts inside this one, then its ``_apply_model``), untouched.
    Early stage: the early patcher registered under ``key`` on the patcher being sampled (the
    ``STAGE_PATCHER`` of a nested stage, else ``executor.class_obj.current_patcher``, which ComfyUI's
    ``pre_run`` sets on the sampled patcher and on each multi-GPU device clone), run with its own
    transformer_options and model_function_wrapper, without ``control``.
    Immutable except for a per-run threshold cache; deep copies (``ModelPatcher.clone``) share it.
    """

    def __init__(self, switch: SwitchPoint, *, key: str | None = None,
                 names: tuple[str, str] = ("early UNet", "late UNet")):
        self.switch = switch
        self.key = key or f"{KEY_PREFIX}.{uuid.uuid4().hex[:12]}"
        self.names = names
        self._cache: dict = {}  # device of the sampled schedule -> (schedule tensor, threshold)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"MultiUNetRouter({self.switch.kind}={self.switch.value}, {self.names[0]} -> {self.names[1]})"

    # -- decisions (pure) --------------------------------------------------------------------
    def threshold(self, sample_sigmas: Any) -> float:
        if self.switch.kind == "sigma":
            return self.switch.value
        slot = getattr(sample_sigmas, "device", None)
        hit = self._cache.get(slot)  # one entry per device: multi-GPU threads each keep their own
        if hit is not None and sample_sigmas is not None and hit[0] is sample_sigmas:
            return hit[1]
        sig = [float(x) for x in sample_sigmas] if sample_sigmas is not None else None
        thr = self.switch.threshold(sig)
        self._cache[slot] = (sample_sigmas, thr)
        early, late = steps_per_stage(sig, [thr])
        log.info("MultiUNet: %d of %d steps on %s, %d on %s (switch sigma %.4g)", early, early + late,
                 self.names[0], late, self.names[1], thr)
        return thr

    def stage(self, sigma: float, sample_sigmas: Any = None) -> int:
        return EARLY if sigma > self.threshold(sample_sigmas) else LATE

    # -- the wrapper ---------------------------------------------------------------------------
    def __call__(self, executor: Callable, *args, **kwargs) -> Any:
        x, t, c = split_apply_args(args, kwargs)
        to = c["transformer_options"]
        if self.stage(float(t.reshape(-1)[0]), to.get("sample_sigmas")) == LATE:
            return executor(*args, **kwargs)
        patcher = to.get(STAGE_PATCHER) or getattr(getattr(executor, "class_obj", None), "current_patcher", None)
        return self.run_early(patcher, {"input": x, "timestep": t, "c": c,
                                        "cond_or_uncond": to.get("cond_or_uncond")})

    def resolve_early(self, patcher: Any) -> Any:
        found = patcher.get_additional_models_with_key(self.key) if patcher is not None else []
        if not found:
            raise PackError(
                "the multi-UNet MODEL was run without its early UNet attached (it is resolved from the "
                "model being sampled, which must be the MultiUNetModel output or a clone of it)",
                "connect the MultiUNetModel output straight to the sampler, or through nodes that clone "
                "the MODEL", node="MultiUNetModel", input_name="early_model")
        return found[0]

    def run_early(self, patcher: Any, args: dict) -> Any:
        """The early UNet on ``args`` (model-function layout), with its own options, without ``control``."""
        early = self.resolve_early(patcher)
        c = args["c"]
        main_static = patcher.model_options.get("transformer_options", {})
        c_early = {k: v for k, v in c.items() if k not in ("control", "transformer_options")}
        c_early["transformer_options"] = stage_transformer_options(early, c.get("transformer_options", {}),
                                                                   main_static)
        return call_patcher_model(early, dict(args, c=c_early))


class LateStageWrapper:
    """The late UNet's own ``model_function_wrapper``, kept in the routing MODEL's slot but run only in
    the late UNet's steps; in the early steps the call goes straight to ``apply_model`` (where the router
    sends it to the early UNet). ``to`` / ``models`` / any other hook ComfyUI calls on the slot reach the
    wrapped one."""

    def __init__(self, router: MultiUNetRouter, inner: Callable):
        self.router, self.inner = router, inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model: Callable, args: dict) -> Any:
        to = args["c"].get("transformer_options", {})
        if self.router.stage(float(args["timestep"].reshape(-1)[0]), to.get("sample_sigmas")) == LATE:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def to(self, device):
        inner = self.inner.to(device) if hasattr(self.inner, "to") else self.inner
        return self if inner is self.inner else LateStageWrapper(self.router, inner)

    def __getattr__(self, name):  # models(), cleanup(), ... of the wrapped function
        if name.startswith("__") or name in ("router", "inner"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def install_router(routing: Any, router: MultiUNetRouter, early: Any, *, apply_model_type: str) -> None:
    """Attach ``early`` to ``routing`` (a fresh clone of the late UNet, written to in place) under
    ``router.key`` and make ``router`` its OUTERMOST keyed wrapper of ``apply_model_type`` (ComfyUI's
    ``WrappersMP.APPLY_MODEL``, passed in by the node).

    The late UNet's own wrappers of that type are removed and re-added after the router (on the
    patcher, whose wrappers ComfyUI merges before or after the model_options ones depending on the
    version, so model_options-level ones move onto the patcher too): they then run only in the late
    steps. The late UNet's ``model_function_wrapper`` stays in the slot, gated to the late steps.
    """
    routing.set_additional_models(router.key, [early])
    moved: list[tuple[Any, Callable]] = []
    own = routing.wrappers.get(apply_model_type, {})
    for key in list(own):
        moved += [(key, fn) for fn in own[key]]
        routing.remove_wrappers_with_key(apply_model_type, key)
    to = routing.model_options.get("transformer_options", {})
    by_key = to.get("wrappers", {}).pop(apply_model_type, None) or {}
    for key, fns in by_key.items():
        moved += [(key, fn) for fn in fns]
    routing.add_wrapper_with_key(apply_model_type, router.key, router)
    for key, fn in moved:
        routing.add_wrapper_with_key(apply_model_type, key, fn)
    previous = routing.model_options.get("model_function_wrapper")
    if previous is not None:
        routing.model_options["model_function_wrapper"] = LateStageWrapper(router, previous)


# ------------------------------------------------------------------------------------------------
# CFG-level hooks (sampler_cfg_function, sampler_pre/post_cfg_function) per stage
#
# These live in the MODEL's model_options and are called by the sampler around the UNet calls, not by
# the UNet, so the router above never sees them. Without help the routing MODEL (a clone of the late
# UNet) would run the late UNet's hooks at every step and the early UNet's never. When the stages'
# hooks differ, the routing MODEL gets dispatchers that run, at each sigma, the hooks of the stage
# that runs there (ComfyUI's plain CFG for a stage without a sampler_cfg_function).

CFG_LIST_HOOKS = {"sampler_pre_cfg_function": "conds_out", "sampler_post_cfg_function": "denoised"}


class _StageHook:
    def __init__(self, router: MultiUNetRouter, early: Any, late: Any):
        self.router, self.early, self.late = router, early, late

    def __deepcopy__(self, memo):
        return self

    def pick(self, args: dict) -> Any:
        to = (args.get("model_options") or {}).get("transformer_options", {})
        sigma = float(args["sigma"].reshape(-1)[0])
        return self.early if self.router.stage(sigma, to.get("sample_sigmas")) == EARLY else self.late


class StageCfgFunction(_StageHook):
    """``sampler_cfg_function`` that runs the current stage's own one (plain CFG where it has none)."""

    def __call__(self, args: dict) -> Any:
        fn = self.pick(args)
        if fn is not None:
            return fn(args)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]


class StageCfgList(_StageHook):
    """One entry of a pre/post-CFG hook list that runs the current stage's own list in order."""

    def __init__(self, router: MultiUNetRouter, early: list, late: list, value_key: str):
        super().__init__(router, list(early), list(late))
        self.value_key = value_key

    def __call__(self, args: dict) -> Any:
        out = args[self.value_key]
        for fn in self.pick(args):
            out = fn(dict(args, **{self.value_key: out}))
        return out


def stage_cfg_hooks(router: MultiUNetRouter, early_options: dict, late_options: dict) -> dict:
    """model_options entries for the routing MODEL so that each stage's CFG-level hooks run only in that
    stage; empty when both stages have the same hooks (the routing MODEL then keeps the late ones)."""
    out: dict = {}
    e, l_ = early_options.get("sampler_cfg_function"), late_options.get("sampler_cfg_function")
    if e is not l_:
        out["sampler_cfg_function"] = StageCfgFunction(router, e, l_)
    for name, value_key in CFG_LIST_HOOKS.items():
        e_list, l_list = list(early_options.get(name, [])), list(late_options.get(name, []))
        if len(e_list) != len(l_list) or any(a is not b for a, b in zip(e_list, l_list)):
            out[name] = [StageCfgList(router, e_list, l_list, value_key)]
    return out
