"""EvaluateStudent: a student (or two) against its teacher, inside ComfyUI, with the metrics the papers use.

The engine is ``nodes/host/judging.py`` (shared with ``tools/evaluate.py``) and the maths
``models/students/evaluate``; this module reads the node's inputs, registers the ``models/inception`` folder for the
user's Inception network and reference statistics, numbers the output folder, and shows progress.
"""

from __future__ import annotations

import logging
import os
import re

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.students.evaluate import EvaluationError, load_inception, parse_prompts, read_reference_stats
from .host import judging as J
from .host.unet import node_errors
from .students import CATEGORY

log = logging.getLogger("distilled_unets")

NODE = "EvaluateStudent"
INCEPTION_FOLDER = "inception"
NONE = "none"
OUTPUT_SUBFOLDER = os.path.join("distilled_unets", "evaluate")
#: what a value left to the student means (tooltips)
_BY_STUDENT = ("the student's recommended value (where its structure is a published model's: see Load Distilled "
               "UNet's info output; the report says which values were used)")
DEFAULT_PROMPTS = ("a photo of an astronaut riding a horse on the moon\n"
                   "a bowl of fruit on a wooden table, studio lighting\n"
                   "a red sports car parked on a rainy city street at night\n"
                   "portrait of an old fisherman, detailed, 85 mm")


def _register_inception_folder() -> None:
    """models/inception for the FID Inception network and reference statistics (.npz), merged into an existing
    entry, never replacing one."""
    path = os.path.join(folder_paths.models_dir, INCEPTION_FOLDER)
    exts = set(folder_paths.supported_pt_extensions) | {".npz"}
    if INCEPTION_FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(INCEPTION_FOLDER, path)
        folder_paths.folder_names_and_paths[INCEPTION_FOLDER][1].update(exts)
    else:
        folder_paths.folder_names_and_paths[INCEPTION_FOLDER] = ([path], exts)


_register_inception_folder()


def inception_choices() -> list[str]:
    return [NONE] + [f for f in folder_paths.get_filename_list(INCEPTION_FOLDER) if not f.endswith(".npz")]


def stats_choices() -> list[str]:
    return [NONE] + [f for f in folder_paths.get_filename_list(INCEPTION_FOLDER) if f.endswith(".npz")]


def _resolve(name: str, input_name: str) -> str | None:
    if not name or name == NONE:
        return None
    path = folder_paths.get_full_path(INCEPTION_FOLDER, name)
    if path is None:
        raise EvaluationError(f"'{name}' is not under models/{INCEPTION_FOLDER}", "refresh the node list (press R) "
                              "and pick an existing file", path=name, node=NODE, input_name=input_name)
    return path


_INCEPTION_CACHE: dict[tuple, object] = {}


def inception_of(path: str):
    """The Inception network of ``path`` (one kept in memory between runs, keyed by path, size and mtime)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _INCEPTION_CACHE:
        _INCEPTION_CACHE.clear()
        with node_errors(NODE, "inception"):
            _INCEPTION_CACHE[key] = load_inception(path)
    return _INCEPTION_CACHE[key]


def judging_files(inception: str, reference_stats: str):
    """(Inception network, reference statistics, their paths) of the node's ``inception`` and ``reference_stats``
    inputs (file names under models/inception, or "none"): each read and checked, a typed error naming the node,
    the input and the file otherwise."""
    inc_path = _resolve(inception, "inception")
    stats_path = _resolve(reference_stats, "reference_stats")
    if stats_path and not inc_path:
        raise EvaluationError("reference statistics without an Inception network", "pick the Inception file the "
                              "statistics were made with (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)",
                              node=NODE, input_name="inception")
    net = inception_of(inc_path) if inc_path else None
    stats = None
    if stats_path:
        with node_errors(NODE, "reference_stats"):
            stats = read_reference_stats(stats_path)
    return net, stats, inc_path, stats_path


def output_folder(prefix: str) -> str:
    """A new numbered folder ``output/distilled_unets/evaluate/<prefix>_NNNNN`` (one past the highest there;
    created exclusively, so two runs never share one and nothing is overwritten)."""
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", (prefix or "").strip()).strip("._") or "evaluate"
    root = os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER)
    os.makedirs(root, exist_ok=True)
    pat = re.compile(re.escape(prefix) + r"_(\d{5,})$")
    n = max((int(m.group(1)) for f in os.listdir(root) if (m := pat.match(f))), default=0)
    while True:
        n += 1
        path = os.path.join(root, f"{prefix}_{n:05d}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def evaluate(teacher, student, clip, vae, prompts: str, negative: str, seed: int, images_per_prompt: int, steps: int,
             cfg: float, sampler: str, scheduler: str, width: int, height: int, inception: str = NONE,
             reference_stats: str = NONE, filename_prefix: str = "evaluate", student_2=None, clip_vision=None,
             node_id=None):
    """(grid IMAGE, images IMAGE, report). Every input is checked before the first image."""
    prompt_list = parse_prompts(prompts, node=NODE)
    students = {"student": student}
    if student_2 is not None:
        students["student_2"] = student_2
    fam = J.check_students(teacher, students, NODE)
    v, settings_note = J.resolve_settings(students, fam, NODE, steps=steps, cfg=cfg, sampler=sampler,
                                          scheduler=scheduler, width=width, height=height)
    if clip_vision is not None:
        J.vision_tower(clip_vision, NODE)
    net, stats, inc_path, stats_path = judging_files(inception, reference_stats)
    s = J.Settings(**v, negative=negative, seed=seed, images_per_prompt=images_per_prompt)
    out_dir = output_folder(filename_prefix)
    n = len(prompt_list) * images_per_prompt * (1 + len(students))
    pbar = comfy.utils.ProgressBar(n)
    model_ids = {"teacher": {"value": "teacher MODEL"}, **{k: {"value": f"{k} MODEL"} for k in students}}
    outcome = J.run_evaluation(teacher, students, clip, vae, prompt_list, s, out_dir, model_ids=model_ids,
                               clip_vision=clip_vision, inception=net,
                               inception_note=os.path.basename(inc_path) if inc_path else "",
                               reference_stats=stats, stats_note=os.path.basename(stats_path) if stats_path else "",
                               settings_note=settings_note, node=NODE, progress=pbar.update,
                               cancel=mm.throw_exception_if_processing_interrupted,
                               folder_input="filename_prefix")
    images = torch.cat([v.float() / 255.0 for v in outcome.images.values()])
    log.info("Evaluate Student: %s", outcome.report.splitlines()[0])
    return outcome.grid, images, outcome.report


class EvaluateStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Evaluate Student",
            category=CATEGORY,
            description=("Samples the teacher and the student (and a second one) from the same noise for every "
                         "prompt and seed, saves the 8-bit images, and compares them with the metrics the papers "
                         "use: same-seed PSNR / SSIM / MS-SSIM always; with a CLIP vision model the CLIP image "
                         "cosine, Frechet distance, KID and CMMD in CLIP space and (SDXL / SD 2.x) the CLIP score; "
                         "with an Inception file FID, KID and Inception Score, against the teacher or against "
                         "reference statistics. Writes the PNGs and metrics.json to output/distilled_unets/"
                         "evaluate/<prefix>_NNNNN."),
            is_output_node=True,
            inputs=[
                io.Model.Input("teacher", tooltip="The teacher (e.g. your checkpoint's MODEL). Only read."),
                io.Model.Input("student", tooltip="The student of the same family (Load Distilled UNet, Distill "
                                                  "Student UNet). Only read."),
                io.Clip.Input("clip", tooltip="The teacher family's text encoder (encodes the prompts for every "
                                              "model; SDXL's and SD 2.x's also give the CLIP score's text side)."),
                io.Vae.Input("vae", tooltip="The teacher family's VAE (decodes every model's latents)."),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="One prompt a line. Every prompt is sampled images_per_prompt times."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt for every image (teacher and students alike)."),
                io.Int.Input("seed", default=1234, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Image k of every prompt uses seed + k (BK-SDM: 1234), for every model."),
                io.Int.Input("images_per_prompt", default=2, min=1, max=10_000,
                             tooltip="Seeds per prompt. FID-type figures need many images (the papers: 30K)."),
                io.Int.Input("steps", default=0, min=0, max=10_000,
                             tooltip=f"Sampling steps for every model; 0 = {_BY_STUDENT}, else 25 (BK-SDM: 25)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip=f"Classifier-free guidance; 0 = {_BY_STUDENT}, else 7.5 (BK-SDM: 7.5)."),
                io.Combo.Input("sampler", options=[J.RECOMMENDED, *comfy.samplers.KSampler.SAMPLERS],
                               default=J.RECOMMENDED,
                               tooltip=f"Sampler for every model; {J.RECOMMENDED} = {_BY_STUDENT}, else euler "
                                       "(ancestral/SDE samplers run one image at a time)."),
                io.Combo.Input("scheduler", options=[J.RECOMMENDED, *comfy.samplers.KSampler.SCHEDULERS],
                               default=J.RECOMMENDED,
                               tooltip=f"Scheduler for every model; {J.RECOMMENDED} = {_BY_STUDENT}, else normal."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8,
                             tooltip=f"Image width, a multiple of 8; 0 = {_BY_STUDENT}, else the family's size "
                                     "(SD 1.x/2.x 512, SDXL 1024)."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8,
                             tooltip=f"Image height, a multiple of 8; 0 = {_BY_STUDENT}, else the family's size."),
                io.Combo.Input("inception", options=inception_choices(), default=NONE,
                               tooltip="The FID Inception network in models/inception (pytorch-fid's "
                                       "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's file): adds fid, "
                                       "kid and inception_score. Nothing is downloaded."),
                io.Combo.Input("reference_stats", options=stats_choices(), default=NONE,
                               tooltip="pytorch-fid statistics (.npz with mu, sigma) in models/inception, e.g. "
                                       "BK-SDM's COCO val2014 256 px: adds fid_stats, the absolute FID."),
                io.String.Input("filename_prefix", default="evaluate",
                                tooltip="Name of the numbered output folder under output/distilled_unets/evaluate."),
                io.Model.Input("student_2", optional=True, tooltip="A second student to compare (optional)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision model (Load CLIP Vision: ViT-L/14, ViT-H/14, ViT-bigG/14): "
                                            "adds the CLIP metrics. SDXL + ViT-bigG or SD 2.x + ViT-H also give "
                                            "the CLIP score."),
            ],
            outputs=[io.Image.Output("grid", tooltip="Teacher | student | difference heat map, one row per prompt "
                                                     "and seed (the first 16)."),
                     io.Image.Output("images", tooltip="Every image as saved: the teacher's, then each student's."),
                     io.String.Output("report", tooltip="The metrics table: value, 95 % interval, how many images, "
                                                        "what each says; and what was left out.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, teacher, student, clip, vae, prompts, negative, seed, images_per_prompt, steps, cfg, sampler,
                scheduler, width, height, inception, reference_stats, filename_prefix, student_2=None,
                clip_vision=None) -> io.NodeOutput:
        with node_errors(NODE, "prompts"):
            grid, images, report = evaluate(teacher, student, clip, vae, prompts, negative, seed, images_per_prompt,
                                            steps, cfg, sampler, scheduler, width, height, inception, reference_stats,
                                            filename_prefix, student_2, clip_vision)
        return io.NodeOutput(grid, images, report, ui=ui.PreviewText(report))


NODES = [EvaluateStudent]
