"""Loader nodes: a distilled UNet (file or diffusers folder), or a whole diffusers pipeline folder."""

from __future__ import annotations

import os

import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..models.files.loader import missing_file, resolve_pipeline
from ..models.files.weights import DIFFUSERS_NAMES
from .host.unet import PREDICTIONS, WEIGHT_DTYPES, load_distilled_unet, node_errors

UNET_FOLDERS = "diffusion_models"  # ComfyUI maps the legacy models/unet folder onto this one


def _is_diffusers_folder(path: str) -> bool:
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return "config.json" in names or any(n in names for n in DIFFUSERS_NAMES) or any(
        n.startswith("diffusion_pytorch_model") for n in names)


def unet_choices() -> list[str]:
    """Files under models/diffusion_models (and models/unet), with diffusers folders as one entry each."""
    folders = set()
    for base in folder_paths.get_folder_paths(UNET_FOLDERS):
        if not os.path.isdir(base):
            continue
        for root, dirs, _files in os.walk(base, followlinks=True):
            dirs.sort()
            if root != base and _is_diffusers_folder(root):
                folders.add(os.path.relpath(root, base).replace(os.sep, "/") + "/")
    files = [f for f in folder_paths.get_filename_list(UNET_FOLDERS)
             if not any(f.replace(os.sep, "/").startswith(d) for d in folders)]
    return sorted(folders) + files


def resolve_unet(name: str) -> str:
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths(UNET_FOLDERS):
            p = os.path.join(base, name.rstrip("/"))
            if os.path.isdir(p):
                return p
        raise missing_file("the folder", name, "models/diffusion_models or models/unet")
    try:
        return folder_paths.get_full_path_or_raise(UNET_FOLDERS, name)
    except FileNotFoundError as e:
        raise missing_file("the file", name, "models/diffusion_models or models/unet") from e


class DistilledUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistilledUNetLoader",
            display_name="Load Distilled UNet",
            category="distilled_unets/loaders",
            description=("Loads any Stable Diffusion UNet - distilled students (BK-SDM, segmind small/tiny-sd, "
                         "SSD-1B, Segmind-Vega, KOALA, SDXS) and full teachers - from a single file or a "
                         "diffusers unet/ folder, by detecting its structure from the tensors. Runs on ComfyUI's "
                         "own UNet. The info output says what was detected."),
            inputs=[
                io.Combo.Input("unet_name", options=unet_choices(),
                               tooltip="A file, or a diffusers folder (ending in /), under models/diffusion_models "
                                       "or models/unet. Diffusers, ldm and converted single-file layouts all work."),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default",
                               tooltip="Storage dtype of the weights, as in ComfyUI's Load Diffusion Model; "
                                       "'default' lets ComfyUI choose for your device."),
                io.Combo.Input("prediction", options=PREDICTIONS, default="auto",
                               tooltip="auto: from the pipeline's scheduler config, the file's metadata or name; "
                                       "otherwise epsilon (every released student). Set v_prediction for a "
                                       "768-v SD2 student."),
            ],
            outputs=[io.Model.Output(tooltip="The UNet, built as ComfyUI's own UNetModel."),
                     io.String.Output("info", tooltip="What was detected: model, teacher, parameters, "
                                                      "estimated per-step cost vs the teacher, recommended settings.")],
        )

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str, prediction: str) -> io.NodeOutput:
        with node_errors("DistilledUNetLoader", "unet_name"):
            model, text = load_distilled_unet(resolve_unet(unet_name), weight_dtype, prediction)
        return io.NodeOutput(model, text, ui=ui.PreviewText(text))


def pipeline_choices() -> list[str]:
    out = []
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs.sort()
            if "model_index.json" in files or ("unet" in dirs and root != base):
                out.append(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []
    return sorted(out)


class DistilledPipelineLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistilledPipelineLoader",
            display_name="Load Distilled Pipeline (diffusers)",
            category="distilled_unets/loaders",
            description=("Loads a whole diffusers pipeline folder (unet/, text_encoder/ [+ text_encoder_2/], vae/) "
                         "from models/diffusers: the UNet by structural detection, the text encoders and VAE "
                         "with ComfyUI's own loaders."),
            inputs=[
                io.Combo.Input("pipeline", options=pipeline_choices(),
                               tooltip="A diffusers pipeline folder under models/diffusers "
                                       "(e.g. a git clone of segmind/tiny-sd)."),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default",
                               tooltip="Storage dtype of the UNet weights."),
                io.Combo.Input("prediction", options=PREDICTIONS, default="auto",
                               tooltip="auto reads scheduler/scheduler_config.json."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output(),
                     io.String.Output("info", tooltip="What was detected in unet/.")],
        )

    @classmethod
    def execute(cls, pipeline: str, weight_dtype: str, prediction: str) -> io.NodeOutput:
        with node_errors("DistilledPipelineLoader", "pipeline"):
            folder = next((os.path.join(base, pipeline) for base in folder_paths.get_folder_paths("diffusers")
                           if os.path.isdir(os.path.join(base, pipeline))), None)
            if folder is None:
                raise missing_file("the pipeline folder", pipeline, "models/diffusers")
            parts = resolve_pipeline(folder)
            model, text = load_distilled_unet(parts.unet, weight_dtype, prediction)
            clip = comfy.sd.load_clip(parts.text_encoders,
                                      embedding_directory=folder_paths.get_folder_paths("embeddings"))
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(parts.vae, safe_load=True))
        return io.NodeOutput(model, clip, vae, text, ui=ui.PreviewText(text))


NODES = [DistilledUNetLoader, DistilledPipelineLoader]
