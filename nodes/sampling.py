"""Multi-UNet sampling nodes: a small UNet for the early (high-noise) steps, the full UNet for the
late ones, inside ONE sampler run (A-SDM). The routing logic lives in ``models/patches/multi_unet.py``."""

from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..models.errors import IncompatibleModelsError
from ..models.patches.multi_unet import (
    LoadedStage,
    MultiUNetRouter,
    SwitchPoint,
    UNetSignature,
    check_compatible,
    check_shared_weights,
    check_switch_percent,
    check_switch_step,
    install_router,
    stage_cfg_hooks,
    stage_patchers,
)

log = logging.getLogger("distilled_unets")

CATEGORY = "distilled_unets/sampling"
_PREDICTIONS = {"EPS": "eps", "V_PREDICTION": "v_prediction", "EDM": "edm", "X0": "x0",
                "IMG_TO_IMG": "img_to_img", "CONST": "flow", "COSMOS_RFLOW": "cosmos_rflow"}


# ------------------------------------------------------------------------------------------------
# glue: read what the compatibility check needs from a ModelPatcher


def prediction_of(patcher) -> str:
    """Prediction type the model will actually use (its model_sampling, object patches included)."""
    ms = patcher.get_model_object("model_sampling")
    for cls in type(ms).__mro__:
        if cls.__module__ == "comfy.model_sampling" and cls.__name__ in _PREDICTIONS:
            return _PREDICTIONS[cls.__name__]
    return str(getattr(patcher.model, "model_type", type(ms).__name__)).lower()


def signature_of(patcher, label: str) -> UNetSignature:
    base = patcher.model
    cfg = base.model_config
    unet = cfg.unet_config
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    stages = stage_patchers(patcher, label)
    chain = f", {len(stages)}-stage multi-UNet" if len(stages) > 1 else ""
    name = f"{label} ({type(cfg).__name__} UNet, {params / 1e6:.1f}M params{chain})"
    lf = base.latent_format
    return UNetSignature(
        name=name,
        latent_format=type(lf).__name__,
        latent_channels=int(getattr(lf, "latent_channels", 4)),
        context_dim=unet.get("context_dim"),
        adm_channels=unet.get("adm_in_channels"),
        prediction=prediction_of(patcher),
        in_channels=int(unet.get("in_channels", 4)),
    )


def _weights_token(patcher):
    patches = tuple(sorted((k, len(v)) for k, v in patcher.patches.items()))
    objs = tuple(sorted((k, id(v)) for k, v in patcher.object_patches.items()))
    return (patcher.patches_uuid if patcher.patches else None, patches, objs)


def make_multi_unet_model(early, late, switch: SwitchPoint, *, node: str):
    """Clone ``late`` into a MODEL that routes calls above the switch sigma to (a clone of) ``early``."""
    sig_e, sig_l = signature_of(early, "early_model"), signature_of(late, "late_model")
    check_compatible(sig_e, sig_l, node=node)

    early_c = early.clone()
    routing = late.clone()
    if "model_sampling" in late.object_patches:  # the sampler uses late's schedule: share it (pitfall 11)
        early_c.add_object_patch("model_sampling", late.get_model_object("model_sampling"))
    ms_e, ms_l = early_c.get_model_object("model_sampling"), late.get_model_object("model_sampling")
    if hasattr(ms_e, "sigmas") and hasattr(ms_l, "sigmas") and not (
            ms_e.sigmas.shape == ms_l.sigmas.shape and torch.equal(ms_e.sigmas.cpu(), ms_l.sigmas.cpu())):
        raise IncompatibleModelsError(
            f"{sig_e.name} and {sig_l.name} use different noise schedules", "put the same "
            "ModelSamplingDiscrete (or zsnr) node on the late model, the multi-UNet copies it to the "
            "early one; or remove it from the early model", node=node, input_name="early_model")

    leaves = stage_patchers(early_c, "early_model") + stage_patchers(late, "late_model")
    check_shared_weights([LoadedStage(n, id(p.model), _weights_token(p)) for n, p in leaves], node=node)

    router = MultiUNetRouter(switch, names=(sig_e.name, sig_l.name))
    # a keyed APPLY_MODEL wrapper (outermost), not the single model_function_wrapper slot: a later node
    # that sets that slot without chaining leaves the routing in place
    install_router(routing, router, early_c, apply_model_type=comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    # CFG-level hooks (e.g. RescaleCFG, PerpNeg-style pre-CFG) run only in their own UNet's stage
    routing.model_options.update(stage_cfg_hooks(router, early_c.model_options, late.model_options))
    return routing


# ------------------------------------------------------------------------------------------------
# nodes


class MultiUNetModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiUNetModel",
            display_name="Multi-UNet Model (early small / late full)",
            category=CATEGORY,
            description=(
                "A-SDM dynamic sampling: one MODEL for any sampler node that runs the early UNet while "
                "the noise level is above the switch point and the late UNet after it, inside one "
                "sampler run (multistep and SDE samplers stay continuous). Both UNets must be of one "
                "family (same latent space, text conditioning and prediction type). Chain it for N "
                "stages: an input may itself be a Multi-UNet Model."),
            inputs=[
                io.Model.Input("early_model", tooltip="UNet for the early, high-noise steps: usually the "
                               "small distilled one (tiny-sd, BK-SDM, KOALA, SSD-1B)."),
                io.Model.Input("late_model", tooltip="UNet for the late, low-noise steps: usually the full "
                               "teacher. Its noise schedule is the run's; each UNet's own patches "
                               "and CFG hooks act only in its own steps."),
                io.Float.Input("switch_percent", default=0.4, min=0.0, max=1.0, step=0.01, round=0.001,
                               tooltip="Fraction of the denoising schedule run on the early UNet "
                               "(ComfyUI percent convention). 0 = late UNet only, 1 = early UNet only. "
                               "A-SDM: 0.4 (10 of 25 steps)."),
            ],
            outputs=[io.Model.Output(tooltip="Routing MODEL: connect to any sampler node.")],
        )

    @classmethod
    def execute(cls, early_model, late_model, switch_percent) -> io.NodeOutput:
        p = check_switch_percent(switch_percent, node="MultiUNetModel", input_name="switch_percent")
        switch = SwitchPoint.from_percent(late_model.get_model_object("model_sampling"), p)
        return io.NodeOutput(make_multi_unet_model(early_model, late_model, switch, node="MultiUNetModel"))


class MultiUNetKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiUNetKSampler",
            display_name="KSampler (Multi-UNet)",
            category=CATEGORY,
            description=(
                "KSampler with a second UNet: the early model runs the first switch_step steps, the model "
                "the rest, in one uninterrupted sampler run (routed on the exact sigma of that step)."),
            inputs=[
                io.Model.Input("model", tooltip="The full (late) UNet: runs from switch_step to the end."),
                io.Model.Input("early_model",
                               tooltip="The small (early) UNet: runs steps 0 .. switch_step-1."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=25, min=1, max=10000, tooltip="Number of sampling steps."),
                io.Int.Input("switch_step", default=10, min=0, max=10000,
                             tooltip="Steps run on the early UNet (A-SDM: 10 of 25). 0 = late only, "
                             "= steps: early only."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampling algorithm (every ComfyUI sampler works)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Noise schedule."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Amount of denoising; the switch step counts the steps actually run."),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, early_model, seed, steps, switch_step, cfg, sampler_name, scheduler, positive,
                negative, latent_image, denoise=1.0) -> io.NodeOutput:
        k = check_switch_step(switch_step, steps, node="MultiUNetKSampler", input_name="switch_step")
        routed = make_multi_unet_model(early_model, model, SwitchPoint.from_step(k), node="MultiUNetKSampler")
        return io.NodeOutput(sample_latent(routed, seed, steps, cfg, sampler_name, scheduler, positive,
                                           negative, latent_image, denoise))


def sample_latent(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise):
    """What KSampler does: noise from the seed, previews and progress bar, one comfy.sample.sample call."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                  seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


NODES = [MultiUNetModel, MultiUNetKSampler]
