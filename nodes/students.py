"""Student nodes: build a student UNet from a teacher (BK-SDM / SDXL presets, A-SDM combinations) and save
any UNet as a file the loader reads back with its recipe.

The recipes and the copy rule live in ``models/students/builder.py``; building a MODEL from them and writing
files is ``nodes/host/students.py`` (shared with the distillation node and ``tools/distill.py``).
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..models.errors import PackError
from ..models.structure.structures import PRESETS
from ..models.students import builder
from .host.students import (  # noqa: F401  (public here too: the node module's former home of these helpers)
    PACK_VERSION,
    SAVE_DTYPES,
    build_student,
    sampling_of,
    save_metadata,
    write_unet,
)
from .host.unet import node_errors

log = logging.getLogger("distilled_unets")

CATEGORY = "distilled_unets/distill"


class BuildStudentUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=builder.NODE,
            display_name="Build Student UNet",
            category=CATEGORY,
            description=("Builds a smaller student UNet of your teacher (any SD 1.x, SD 2.x or SDXL model, "
                         "fine-tunes included) by removing blocks as the published recipes do (BK-SDM, SSD-1B, "
                         "Segmind-Vega, KOALA) or by A-SDM's combination with a distilled base student, and "
                         "initialises it from the teacher's weights. The student must be distilled "
                         "(Distill Student UNet) before it makes good images."),
            inputs=[
                io.Model.Input("teacher", tooltip="The full teacher UNet (e.g. from Load Checkpoint); only read."),
                io.Combo.Input("preset", options=list(PRESETS), default="bk-small",
                               tooltip="bk-base / bk-small / bk-tiny: BK-SDM for SD 1.x / 2.x teachers; ssd-1b, "
                                       "vega, koala-700m, koala-1b: SDXL students; asdm-m1 / asdm-m2: A-SDM's "
                                       "combination of a distilled base student's shallow blocks with the teacher's."),
                io.Model.Input("base_student", optional=True,
                               tooltip="For asdm-m1 / asdm-m2 only: a distilled BK-Base-structured student of the "
                                       "same family (bk-sdm-base, small-sd, or a bk-base student distilled here)."),
                io.Int.Input("condconv_experts", default=0, min=0, max=8, optional=True,
                             tooltip="A-SDM's CLME-CondConv: 0 = off; K > 0 turns the 3x3 convolutions of the "
                                     "shallowest down and up stage into conditional convolutions with K experts "
                                     "(the layer's own kernel, the teacher's kernels of the merged layers, random "
                                     "ones; A-SDM uses 2). Identical output until distilled. Files with CondConv "
                                     "load only with Load Distilled UNet."),
                io.String.Input("teacher_name", default="", optional=True,
                                tooltip="The teacher's name as the saved student's recipe should record it (e.g. the "
                                        "checkpoint file name); its weights' sha256 is recorded either way."),
            ],
            outputs=[io.Model.Output(tooltip="The student, built as ComfyUI's own UNet (like a loaded one)."),
                     io.String.Output("info", tooltip="Parameters and per-step cost against the teacher; which "
                                                      "tensors came from which teacher block; documented choices.")],
        )

    @classmethod
    def execute(cls, teacher, preset, base_student=None, condconv_experts=0, teacher_name="") -> io.NodeOutput:
        with node_errors(builder.NODE, "preset"):
            student, info = build_student(teacher, preset, base_student, teacher_name or "",
                                          condconv_experts=condconv_experts or 0)
        return io.NodeOutput(student, info, ui=ui.PreviewText(info))


def save_folder() -> str:
    """The first diffusion_models folder (a user's ``is_default`` extra path comes first), except that ComfyUI's
    own legacy ``models/unet``, which it lists before its ``models/diffusion_models``, gives way to the latter."""
    paths = folder_paths.get_folder_paths("diffusion_models")
    legacy, current = (os.path.join(folder_paths.models_dir, f) for f in ("unet", "diffusion_models"))
    return current if paths[0] == legacy and current in paths else paths[0]


def save_unet(model, filename_prefix: str, dtype: str, title: str = "") -> str:
    """Save a MODEL's UNet under models/diffusion_models in the ldm layout of ComfyUI's ModelSave."""
    out_dir = save_folder()
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    except Exception as e:  # ComfyUI refuses prefixes that leave the folder
        raise PackError(f"the name prefix {filename_prefix!r} would save outside models/diffusion_models",
                        "use a relative name such as 'students/my-student'", node="SaveStudentUNet",
                        input_name="filename_prefix") from e
    path = write_unet(model, folder, lambda n: f"{filename}_{n:05}_.safetensors", dtype, title.strip() or filename,
                      start=counter)
    log.info("SaveStudentUNet: wrote %s", path)
    return path


class SaveStudentUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveStudentUNet",
            display_name="Save Student UNet",
            category=CATEGORY,
            description=("Saves a MODEL's UNet (a student built or distilled here, or any UNet) as one .safetensors "
                         "file under models/diffusion_models, in the layout ComfyUI's ModelSave writes, with its "
                         "prediction type and, for students built here, their recipe and block map. Load Distilled "
                         "UNet reads it back; numbered files are never overwritten."),
            inputs=[
                io.Model.Input("model", tooltip="The UNet to save (e.g. from Build / Distill Student UNet)."),
                io.String.Input("filename_prefix", default="students/student",
                                tooltip="File name prefix under models/diffusion_models; a number is appended."),
                io.Combo.Input("dtype", options=list(SAVE_DTYPES), default="fp16",
                               tooltip="Storage precision of the saved weights (fp16 halves the file size)."),
                io.String.Input("title", default="", optional=True, tooltip="modelspec.title of the file."),
            ],
            outputs=[io.String.Output("path", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, dtype, title="") -> io.NodeOutput:
        with node_errors("SaveStudentUNet", "model"):
            path = save_unet(model, filename_prefix, dtype, title or "")
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {path}"))


NODES = [BuildStudentUNet, SaveStudentUNet]
