"""DistillStudentUNet: knowledge distillation of a student UNet from its teacher, inside ComfyUI.

The training engine is host-free (``models/students/distill/``) and set up from two MODELs by
``nodes/host/distill.py``, as ``tools/distill.py`` sets it up; this module holds the node: ComfyUI values into
the engine's data (LATENT + CONDITIONING through the model's own ``process_latent_in`` and ``extra_conds``, or
a streamed dataset), the checkpoint folder under ComfyUI's output, the VGG file under ``models/vgg``, progress,
Cancel between steps, and the trained (or best) weights handed back as a new MODEL.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.errors import WeightFileError
from ..models.students import distill as D
from ..models.students.distill import runs
from .datasets import DISTILL_DATA, DistillDataset
from .host import distill as H
from .host import judging as J
from .host.samples import make_kd_data, prepare_sample
from .host.students import PACK_VERSION
from .host.unet import node_errors
from .students import CATEGORY

log = logging.getLogger("distilled_unets")

NODE = "DistillStudentUNet"
TRAIN_MODES = list(D.TRAIN_MODES)
LOSS_CHOICES = ["bk-sdm", "segmind", "custom"]
FEATURE_CHOICES = list(D.FEATURE_MODES[1:]) + ["none"]  # stages, stages+mid, none
PRECISIONS = list(D.PRECISIONS)
VGG_FOLDER = "vgg"
NONE = "none"
BK_SDM_SAMPLES = D.BK_SDM_SAMPLES
#: what the best_metric input offers: the engine's own held-out error, and the image metrics of the held-out
#: evaluation (with the teacher's VAE connected; the CLIP ones with a CLIP vision model too)
IMAGE_METRICS = ["psnr", "ssim", "ms_ssim"]
CLIP_METRICS = ["clip_image_cosine", "fd_clip", "kid_clip", "cmmd"]
BEST_METRICS = [NONE, D.HELDOUT_KD, *IMAGE_METRICS, *CLIP_METRICS]
EVAL_SAMPLING_STEPS = 8  # Euler steps of the held-out images (the same noise for teacher and student)
MEMORY_OPTIONS = ("selective_recompute", "ema_on_host")  # memory inputs the out-of-memory refusal may name


def _register_vgg_folder() -> None:
    """models/vgg for the user's VGG16 weights (merged into an existing entry, never replacing one)."""
    path = os.path.join(folder_paths.models_dir, VGG_FOLDER)
    if VGG_FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(VGG_FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[VGG_FOLDER] = ([path], set(folder_paths.supported_pt_extensions))


_register_vgg_folder()


def vgg_choices() -> list[str]:
    return [NONE] + folder_paths.get_filename_list(VGG_FOLDER)


def checkpoint_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), "distilled_unets", "distill_checkpoints")


def checkpoint_choices() -> list[str]:
    root = checkpoint_root()
    out = []
    if os.path.isdir(root):
        for base, dirs, files in os.walk(root):
            dirs.sort()
            out += [os.path.relpath(os.path.join(base, f), root).replace(os.sep, "/") for f in sorted(files)
                    if f.endswith(".safetensors") and not f.startswith(".")]
    return [NONE] + out


def _resolve_checkpoint(name: str) -> str | None:
    if not name or name == NONE:
        return None
    root = os.path.abspath(checkpoint_root())
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        raise D.CheckpointError(f"the checkpoint '{name}' is not under {root}",
                                "refresh the node list (press R) and pick an existing checkpoint", path=name,
                                node=NODE, input_name="resume_from")
    return path


# ------------------------------------------------------------------------------------------------
# ComfyUI values -> engine inputs


def make_data(teacher, latents, conditioning, *, which: str) -> D.KDData:
    """KDData from LATENT + CONDITIONING values: one of each, or the lists Make / Load Training Dataset and
    Resolution Bucket output (``nodes.host.samples.pair_samples``), through the teacher's own ``process_latent_in`` and
    ``extra_conds`` (SDXL's pooled and size conditioning included)."""
    inputs = ("latents", "conditioning") if which == "train" else ("heldout_latents", "heldout_conditioning")
    return make_kd_data(teacher.model, latents, conditioning, node=NODE, inputs=inputs)


def training_data(teacher, latents, conditioning, data, *, hold_out: bool = True):
    """(the engine's data source, held-out data or None, what was held out) from exactly one data form: LATENT +
    CONDITIONING (single or lists), or a DISTILL_DATA from Load Distillation Dataset. ``hold_out``: keep the last
    ~10 % of in-memory samples out of training to measure progress on (a streamed dataset: its loader's
    ``heldout_fraction``, samples chosen by seed)."""
    given = [name for name, v in (("latents", latents), ("conditioning", conditioning), ("data", data))
             if v is not None]
    if not given:
        raise D.DistillError("no training data is connected",
                             "connect latents + conditioning (VAE Encode or a KSampler with CLIP Text Encode, or "
                             "the lists of Make / Load Training Dataset), or data from Load Distillation Dataset",
                             node=NODE, input_name="latents")
    if data is not None and len(given) > 1:
        raise D.DistillError("two forms of training data are connected (latents/conditioning and data)",
                             "connect either latents + conditioning or data, not both", node=NODE, input_name="data")
    if data is not None:
        if not isinstance(data, DistillDataset):
            raise D.DistillError(f"data is a {type(data).__name__}, not a dataset", "connect Load Distillation "
                                 "Dataset's output", node=NODE, input_name="data")
        with node_errors(NODE, "data"):
            src = data.open(functools.partial(prepare_sample, teacher.model, node=NODE, input_name="data"))
        fraction = getattr(data, "heldout_fraction", 0.0) if hold_out else 0.0
        if not fraction:
            return src, None, ("none (heldout_fraction 0 on Load Distillation Dataset: set a fraction, or connect "
                               "held-out latents, to measure progress)")
        return D.split_heldout(src, fraction)
    if len(given) == 1:
        missing = "conditioning" if given == ["latents"] else "latents"
        raise D.DistillError(f"{given[0]} without {missing}", f"connect {missing} too (one caption per latent, in "
                             "order, or one for all)", node=NODE, input_name=missing)
    src = make_data(teacher, latents, conditioning, which="train")
    if not hold_out:
        return src, None, ""
    n = len(src)
    k = max(1, n // 10) if n >= 2 else 0
    if not k:
        return src, None, "none (one sample only: connect held-out latents to measure progress)"
    head, held = src.split_tail(k)
    return head, held, f"the last {k} of {n} samples (held out, not trained on)"


def _describe(data: D.KDData) -> str:
    sizes = sorted({s[-2:] for s, _ in data.buckets()}, key=lambda hw: hw[0] * hw[1])
    return f"{len(data)} samples in memory, latents " + ", ".join(f"{w * 8}x{h * 8}" for h, w in sizes)


def _plottable(values) -> list[float]:
    """Loss values for Plot Loss Graph: a non-finite value (a skipped step) repeats the last finite one."""
    out, last = [], 0.0
    for v in values:
        last = v if math.isfinite(v) else last
        out.append(last)
    return out


def _run_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", (name or "").strip()).strip("._") or "distill"
    return name[:80]


def _send_text(node_id, text: str) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (tests, scripts): the progress bar is enough
        pass


def distill(student, teacher, latents=None, conditioning=None, *, data=None, steps: int, batch_size: int,
            gradient_accumulation: int, learning_rate: float, loss_weights: str, feature_points: str, train: str,
            seed: int, ema_decay: float, gradient_checkpointing: bool, checkpoint_every: int = 0,
            precision: str = "auto", heldout_latents=None, heldout_conditioning=None, resume_from: str = NONE,
            run_name: str = "distill", vgg16: str = NONE, task_weight: float = 1.0, output_weight: float = 1.0,
            feature_weight: float = 1.0, mid_weight: float = 1.0, vgg_weight: float = 1.0, keep_checkpoints: int = 2,
            eval_every: int = 0, best_metric: str = NONE, vae=None, clip_vision=None, selective_recompute: bool = False,
            ema_on_host: bool = False, node_id=None):
    """(trained student MODEL, LOSS_MAP, report). The inputs are only read."""
    with torch.inference_mode(False):
        return _distill(**locals())


def _vgg_path(name: str) -> str:
    path = folder_paths.get_full_path(VGG_FOLDER, name)
    if path is None:
        raise WeightFileError(f"the VGG16 file '{name}' is not under models/{VGG_FOLDER}",
                              "refresh the node list (press R) and pick an existing file", path=name,
                              node=NODE, input_name="vgg16")
    return path


def read_vgg16(name: str):
    """(frozen VGG16 features, path) of the file ``name`` under models/vgg, checked before any training."""
    path = _vgg_path(name)
    return H.read_vgg16(path, node=NODE, input_name="vgg16"), path


def _vgg(vgg16: str, teacher, weights):
    if not vgg16 or vgg16 == NONE:
        return None, None
    return H.vgg_loss(_vgg_path(vgg16), teacher, weights, node=NODE, input_name="vgg16")


def _evaluator(teacher, held, vae, clip_vision, best_metric: str, *, prediction: str, seed: int):
    """The image evaluator of the held-out samples (with the teacher's VAE), or None: then the engine's own
    held-out output-KD error alone. A best metric that needs an input not connected is refused here."""
    if vae is None:
        if clip_vision is not None or best_metric in IMAGE_METRICS + CLIP_METRICS:
            what = f"best_metric {best_metric}" if best_metric in IMAGE_METRICS + CLIP_METRICS else "clip_vision"
            raise D.DistillError(f"{what} needs the held-out images, and no VAE is connected",
                                 "connect the teacher's VAE to vae (Load Checkpoint's VAE), or pick heldout_kd",
                                 node=NODE, input_name="vae")
        return None
    if clip_vision is None and best_metric in CLIP_METRICS:
        raise D.DistillError(f"best_metric {best_metric} is a CLIP metric and no CLIP vision model is connected",
                             "connect Load CLIP Vision to clip_vision, or pick psnr / ssim / heldout_kd", node=NODE,
                             input_name="clip_vision")
    with node_errors(NODE, "vae"):
        return J.heldout_evaluator(teacher, held, vae, clip_vision, prediction=prediction,
                                   steps=EVAL_SAMPLING_STEPS, seed=seed, node=NODE)


def _distill(student, teacher, latents, conditioning, *, data, steps, batch_size, gradient_accumulation, learning_rate,
             loss_weights, feature_points, train, seed, ema_decay, gradient_checkpointing, checkpoint_every,
             precision, heldout_latents, heldout_conditioning, resume_from, run_name, vgg16, task_weight,
             output_weight, feature_weight, mid_weight, vgg_weight, keep_checkpoints, eval_every, best_metric,
             vae, clip_vision, selective_recompute, ema_on_host, node_id):
    t_start = time.perf_counter()
    prediction, _ = H.check_predictions(teacher, student, NODE)
    if (heldout_latents is None) != (heldout_conditioning is None):
        raise D.DistillError("held-out latents and held-out conditioning must be given together",
                             "connect both, or neither (then the last ~10 % of the data are held out)", node=NODE,
                             input_name="heldout_latents" if heldout_latents is None else "heldout_conditioning")
    data, held, held_note = training_data(teacher, latents, conditioning, data,
                                          hold_out=heldout_latents is None)
    data_note = data.describe() if hasattr(data, "describe") else _describe(data)
    if heldout_latents is not None:
        held = make_data(teacher, heldout_latents, heldout_conditioning, which="heldout")
        held_note = "the held-out inputs"
    with node_errors(NODE, "loss_weights"):
        weights = D.loss_weights(loss_weights, task_weight, output_weight, feature_weight, mid_weight, vgg_weight)
    semantic, vgg_note = _vgg(vgg16, teacher, weights)
    ckpt_dir = os.path.join(checkpoint_root(), _run_name(run_name)) if checkpoint_every else None
    resume = _resolve_checkpoint(resume_from)
    if resume and not ckpt_dir:  # keep checkpointing beside the one resumed from
        ckpt_dir = os.path.dirname(resume)
    if ckpt_dir and hasattr(data, "shard_digests"):
        data.digest_cache_dir = ckpt_dir  # the shards' content digests, computed once, kept beside the checkpoints
    cfg = D.DistillConfig(steps=steps, batch_size=batch_size, grad_accum=gradient_accumulation,
                          learning_rate=learning_rate, weights=weights, features=feature_points, seed=seed,
                          ema_decay=ema_decay, gradient_checkpointing=gradient_checkpointing, precision=precision,
                          checkpoint_every=checkpoint_every, checkpoint_dir=ckpt_dir,
                          checkpoint_prefix=_run_name(run_name), keep_checkpoints=keep_checkpoints,
                          selective_recompute=bool(selective_recompute), ema_on_host=bool(ema_on_host))
    with node_errors(NODE, "steps"):
        cfg.validate()
    device = mm.get_torch_device()
    best_metric = "" if not best_metric or best_metric == NONE else best_metric
    best_state = {}
    last_text = [0.0]
    evals_text = []

    def on_eval(step, metrics, is_best):
        evals_text.append(f"step {step}: " + ", ".join(f"{k} {v:.5g}" for k, v in metrics.items())
                          + (" (best)" if is_best else ""))
        _send_text(node_id, "evaluation at " + evals_text[-1])

    run = H.make_run(teacher, student, data, held, cfg, train=train, device=device, node=NODE, semantic=semantic,
                     evaluator=_evaluator(teacher, held, vae, clip_vision, best_metric, prediction=prediction,
                                          seed=seed),
                     eval_schedule=D.EvalSchedule(eval_every, best_metric),
                     on_eval=on_eval, save_best=lambda step, state: best_state.update(step=step, state=state))
    d = run.distiller
    if ckpt_dir:  # the checkpoints kept must fit the disk
        mine = [p for _, _, p in runs.checkpoints_in(ckpt_dir)] if resume else []
        with node_errors(NODE, "keep_checkpoints"):
            disk = runs.plan_run_disk(ckpt_dir, d, student_bytes=0, best=False, held_paths=mine,
                                      names=runs.INPUT_NAMES, node=NODE).describe()
    # memory before the first step: the teacher through ComfyUI's loader (it frees what the run needs), then the
    # engine's estimate against what is left (the container's limit included)
    est, free, where = H.load_teacher_and_check_memory(run, teacher, device, comfy_free=mm.get_free_memory,
                                                       extra_fixes=H.own_blocks_fix(run, train),
                                                       options={k: f"turn on {k}" for k in MEMORY_OPTIONS})
    partial = hasattr(teacher, "loaded_size") and teacher.loaded_size() < teacher.model_size()
    pbar = comfy.utils.ProgressBar(steps)

    def progress(step, total, loss):
        pbar.update_absolute(step, total)
        now = time.perf_counter()
        if now - last_text[0] > 1.0 or step == total:
            last_text[0] = now
            _send_text(node_id, f"step {step}/{total}  loss {loss:.5f}")

    def cancel():
        mm.throw_exception_if_processing_interrupted()
        return False

    res = d.run(progress=progress, cancel=cancel, resume=resume)
    recipe = H.recipe_after(student, res, cfg, train=train, made_by=f"{PACK_VERSION} {NODE}")
    use_best = bool(best_metric) and "state" in best_state and res.best is not None
    trained = H.trained_model(run, best_state["state"] if use_best else res.state_dict, recipe, student)
    loss_map = {"loss": _plottable(res.losses)}  # a skipped (non-finite) step keeps the last value; the report
    for k, v in res.parts.items():                 # lists the skipped steps
        loss_map[f"loss_{k}"] = _plottable(v)
    if res.heldout_curve:
        loss_map["heldout"] = [e for _, e in res.heldout_curve]
    if res.evaluations:
        loss_map["eval_steps"] = [e["step"] for e in res.evaluations]
        for k in [k for k in res.evaluations[-1] if k != "step"]:
            loss_map[f"eval_{k}"] = [e.get(k, math.nan) for e in res.evaluations]
    seen = res.steps_done * batch_size * gradient_accumulation
    lines = [
        f"Distilled {run.student_topology.describe()}",
        f"teacher: {run.teacher_topology.describe()}",
        f"what trains: {train} ({len(run.units)} of {len(run.block_map.units)} units; block map "
        f"{run.block_map_note})",
        *res.report,
        f"training data: {data_note}",
        f"held-out samples: {held_note}",
        f"memory estimate before the first step: {est.describe()}; {free / D.GIB:.2f} GiB is {where}",
        f"samples seen in total: {seen:,} = {100 * seen / BK_SDM_SAMPLES:.3g} % of a BK-SDM run "
        "(batch 256 x 50K steps); a few thousand steps retarget a released student toward a fine-tune, a "
        "general-purpose student needs the published budgets",
    ]
    if ckpt_dir:
        lines.append(f"checkpoint folder {ckpt_dir}: {disk}")
    if evals_text:
        lines.append("evaluations: " + "; ".join(evals_text))
    if best_metric:
        lines.append(f"the MODEL output holds the best evaluation's weights ({best_metric} {res.best['value']:.5g} at "
                     f"step {res.best['step']})" if use_best else f"no evaluation gave a {best_metric}: the MODEL "
                     "output holds the final weights")
    if vgg_note:
        lines.append(vgg_note)
    if partial:
        lines.append("the teacher did not fit the GPU whole and ran partly from system memory (slow)")
    if teacher.model_options.get("transformer_options", {}).get("patches") or \
            teacher.model_options.get("transformer_options", {}).get("patches_replace"):
        lines.append("the teacher's attention/block patches are not applied while distilling (its weights, "
                     "LoRAs included, are)")
    lines.append(f"total time {time.perf_counter() - t_start:.1f} s")
    return trained, loss_map, "\n".join(lines)


class DistillStudentUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Distill Student UNet",
            category=CATEGORY,
            description=("Trains a student UNet toward its teacher by knowledge distillation (BK-SDM: denoising "
                         "loss + output KD + feature KD at every stage; A-SDM: incubation of the student's own "
                         "blocks, mid-block and VGG supervision) on latents and captions you give as ComfyUI "
                         "values (LATENT + CONDITIONING, the lists of Make / Load Training Dataset or Resolution "
                         "Bucket, or a dataset streamed by Load Distillation Dataset). Returns a new trained MODEL "
                         "(the inputs are not changed), the loss curve for Plot Loss Graph, and a report. Realistic "
                         "inside ComfyUI: retargeting a released student (e.g. bk-sdm-small) toward your fine-tune "
                         "for a few thousand steps."),
            is_input_list=True,  # latents/conditioning may be lists (Make Training Dataset): one run over all of them
            inputs=[
                io.Model.Input("student", tooltip="The student: from Build Student UNet, or any loaded student of "
                                                  "the teacher's family (retargeting). Only read."),
                io.Model.Input("teacher", tooltip="The teacher (e.g. your fine-tune from Load Checkpoint). Only read."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Training latents: VAE Encode of your images or latents the teacher generated "
                                        "with a KSampler (one LATENT batch), or the latents list of Make / Load "
                                        "Training Dataset or Resolution Bucket (sizes may differ: each batch is "
                                        "drawn from one size). Give these with conditioning, or data instead."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Their captions: CLIP Text Encode (one per latent, in order, or one for "
                                              "all), or the conditioning list that came with the latents list."),
                io.Custom(DISTILL_DATA).Input(
                    "data", optional=True,
                    tooltip="Instead of latents + conditioning: a dataset streamed shard by shard from ComfyUI's "
                            "datasets folder (Load Distillation Dataset), for data that do not fit in memory. "
                            "Prepared with the teacher; the loader's heldout_fraction is held out of training "
                            "and measures progress (held-out latents connected here replace it)."),
                io.Int.Input("steps", default=1000, min=1, max=10_000_000,
                             tooltip="Optimizer steps (BK-SDM: 50,000 at batch 256)."),
                io.Int.Input("batch_size", default=2, min=1, max=1024, tooltip="Samples per forward pass."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024,
                             tooltip="Forward passes per optimizer step (effective batch = batch_size x this)."),
                io.Float.Input("learning_rate", default=5e-5, min=1e-8, max=1.0, step=1e-6, round=1e-8,
                               tooltip="AdamW learning rate (BK-SDM 5e-5, segmind 1e-5), constant."),
                io.Combo.Input("loss_weights", options=LOSS_CHOICES, default="bk-sdm",
                               tooltip="bk-sdm: task 1, output KD 1, feature KD 1; segmind: 1 / 0.5 / 0.5; custom: "
                                       "the weight inputs below."),
                io.Combo.Input("feature_points", options=FEATURE_CHOICES, default="stages",
                               tooltip="stages: BK-SDM's stage outputs (down and up blocks of every level both "
                                       "models have); stages+mid: also A-SDM's mid-block output where both have "
                                       "one; none: output KD and the task loss only."),
                io.Combo.Input("train", options=TRAIN_MODES, default="all",
                               tooltip="all: every student weight; student blocks only: A-SDM's incubation, the "
                                       "blocks that come from the teacher stay frozen; changed blocks only: the "
                                       "blocks that are not the teacher's own block at the same place."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds the sample order, timesteps and noise of every step (a resumed run "
                                     "reproduces the uninterrupted one)."),
                io.Float.Input("ema_decay", default=0.9999, min=0.0, max=0.99999, step=0.0001, round=0.00001,
                               tooltip="EMA of the trained weights, returned instead of the raw ones (BK-SDM "
                                       "0.9999, warmed up as diffusers' EMAModel); 0 = off."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, ~30 % "
                                         "more time."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="auto: bf16 autocast on a GPU (fp16 where bf16 is missing), fp32 on CPU; "
                                       "master weights are always fp32."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=10_000_000,
                             tooltip="Write a resumable checkpoint every N steps (0 = never) under "
                                     "output/distilled_unets/distill_checkpoints/<run_name>; also on Cancel."),
                io.Latent.Input("heldout_latents", optional=True,
                                tooltip="Held-out latents to measure progress on, one LATENT or a list (else the "
                                        "last ~10 % of in-memory training latents are held out)."),
                io.Conditioning.Input("heldout_conditioning", optional=True,
                                      tooltip="Captions of the held-out latents (one CONDITIONING or a list)."),
                io.Combo.Input("resume_from", options=checkpoint_choices(), default=NONE, optional=True,
                               tooltip="A checkpoint to continue from (same student, data and settings reproduce "
                                       "the uninterrupted run exactly)."),
                io.String.Input("run_name", default="distill", optional=True,
                                tooltip="Folder and file name of this run's checkpoints."),
                io.Combo.Input("vgg16", options=vgg_choices(), default=NONE, optional=True,
                               tooltip="A-SDM's VGG term: torchvision VGG16 weights you put in models/vgg (none "
                                       "ship). It compares the two models' predicted images (latent preview "
                                       "colours) at relu1_2/2_2/3_3."),
                io.Float.Input("task_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="custom loss_weights: the denoising (task) loss."),
                io.Float.Input("output_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="custom loss_weights: output KD."),
                io.Float.Input("feature_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="custom loss_weights: feature KD (sum over the stage outputs)."),
                io.Float.Input("mid_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="custom loss_weights: mid-block term (presets use the feature weight)."),
                io.Float.Input("vgg_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="custom loss_weights: VGG term (presets use the output weight)."),
                io.Int.Input("keep_checkpoints", default=2, min=0, max=1000, optional=True,
                             tooltip="Keep the newest N checkpoints of this run (0 = all); an older one is deleted "
                                     "only after a newer one is completely written. The run is refused before the "
                                     "first step when the checkpoints it keeps would not fit the disk."),
                io.Int.Input("eval_every", default=0, min=0, max=10_000_000, optional=True,
                             tooltip="Evaluate the student (EMA weights) every N steps on the held-out samples; 0: "
                                     "before the first and after the last step only. The values go to the report "
                                     "and the loss map (eval_*)."),
                io.Combo.Input("best_metric", options=BEST_METRICS, default=NONE, optional=True,
                               tooltip="none: the MODEL output is the final weights. Else the weights of the best "
                                       "evaluation by this metric: heldout_kd (lowest held-out output-KD error), "
                                       "psnr / ssim / ms_ssim (closest held-out images to the teacher's, same noise; "
                                       "needs vae), clip_image_cosine / fd_clip / kid_clip / cmmd (needs vae and "
                                       "clip_vision)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The teacher's VAE: each evaluation then samples the held-out captions with "
                                     "teacher and student from the same noise (8 Euler steps), decodes them and "
                                     "reports psnr, ssim, ms_ssim (Evaluate Student's metrics)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="With vae: the CLIP metrics of the held-out images too "
                                            "(clip_image_cosine, fd_clip, kid_clip, cmmd)."),
                io.Boolean.Input("selective_recompute", default=False, optional=True,
                                 tooltip="With gradient_checkpointing off: keep the convolution, matrix-product and "
                                         "attention outputs and recompute only the element-wise ops in the backward "
                                         "pass (about a third less activation memory, a few per cent slower; the "
                                         "same loss and weights)."),
                io.Boolean.Input("ema_on_host", default=False, optional=True,
                                 tooltip="Keep the EMA copy in RAM, updated by a host thread: 4 bytes per trained "
                                         "parameter off the GPU (no effect on the CPU; the same EMA)."),
            ],
            outputs=[io.Model.Output(tooltip="The trained student (a new MODEL; the inputs are unchanged): the final "
                                             "weights, or the best evaluation's with best_metric."),
                     io.Custom("LOSS_MAP").Output("loss_map", tooltip="Loss per step (loss, loss_<term>), for Plot "
                                                  "Loss Graph; evaluations as eval_steps and eval_<metric>."),
                     io.String.Output("report", tooltip="Held-out output-KD error before/after, steps, samples "
                                                        "seen, time, feature points, memory.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, student, teacher, steps, batch_size, gradient_accumulation, learning_rate, loss_weights,
                feature_points, train, seed, ema_decay, gradient_checkpointing, precision, checkpoint_every,
                latents=None, conditioning=None, data=None, heldout_latents=None, heldout_conditioning=None,
                resume_from=NONE, run_name="distill", vgg16=NONE, task_weight=1.0, output_weight=1.0,
                feature_weight=1.0, mid_weight=1.0, vgg_weight=1.0, keep_checkpoints=2, eval_every=0,
                best_metric=NONE, vae=None, clip_vision=None, selective_recompute=False,
                ema_on_host=False) -> io.NodeOutput:
        # is_input_list: the executor hands every input as a list; latents/conditioning stay lists (one value
        # or Make Training Dataset's many), the others must be one value each
        given = dict(locals())
        args = {k: _single(k, v) for k, v in given.items()
                if k not in ("cls", "latents", "conditioning", "heldout_latents", "heldout_conditioning")}
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        with node_errors(NODE, "student"):
            model, loss_map, report = distill(
                args.pop("student"), args.pop("teacher"), latents, conditioning,
                heldout_latents=heldout_latents, heldout_conditioning=heldout_conditioning,
                **dict(args, resume_from=args["resume_from"] or NONE, run_name=args["run_name"] or "distill",
                       vgg16=args["vgg16"] or NONE, best_metric=args["best_metric"] or NONE,
                       keep_checkpoints=2 if args["keep_checkpoints"] is None else args["keep_checkpoints"],
                       eval_every=args["eval_every"] or 0, selective_recompute=bool(args["selective_recompute"]),
                       ema_on_host=bool(args["ema_on_host"])), node_id=node_id)
        return io.NodeOutput(model, loss_map, report, ui=ui.PreviewText(report))


def _single(name: str, value):
    """One input's value (a list of one from the executor, the value itself from a direct call)."""
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise D.DistillError(f"{len(value)} values arrive at {name}", f"connect one value to {name} (only latents "
                             "and conditioning take lists)", node=NODE, input_name=name)
    return value[0]


NODES = [DistillStudentUNet]
