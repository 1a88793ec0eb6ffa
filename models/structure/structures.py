"""Every UNet structure the pack knows, written once, by hand, as the published recipes define them.

ComfyUI's ``supported_models.py`` writes each distilled SDXL as a small change of SDXL; this table
does the same for every student: the three teachers are spelled out, and each student is its
teacher put through a block-removal recipe. The same recipes are the student builder's presets
(``BuildStudentUNet``), so a preset built from a teacher has exactly the structure of its public
counterpart. On top of the structures sit the public models: name, teacher, the published exact
UNet parameter count (checked against the structure by the tests), where people get it, other
names it goes by, and recommended settings in ComfyUI's sampler and scheduler names.

Sources: BK-SDM (Kim et al. 2023, arXiv 2305.15798; github Nota-NetsPresso/BK-SDM ``src/unet_config*``),
segmind distill-sd (``prepare_unet``), SSD-1B / Segmind-Vega (Gupta et al. 2024, arXiv 2401.02677;
model cards), KOALA (Lee et al. 2023, arXiv 2312.04005), SDXS (IDKiro), A-SDM (Zhu et al. 2023,
arXiv 2312.15516, Table 2). Which teacher layers SSD-1B, Vega and KOALA kept is not published: see
``KEPT_LAYERS``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .topology import SDXL_ADM, Topology

# ------------------------------------------------------------------------------------------------
# teachers

SD1 = Topology(family="sd1", model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
               transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
               transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
               transformer_depth_middle=1, context_dim=768, use_linear=False)
SD2 = replace(SD1, family="sd2", context_dim=1024, use_linear=True)
SDXL = Topology(family="sdxl", model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
                transformer_depth_middle=10, context_dim=2048, use_linear=True, adm_in_channels=SDXL_ADM)
TEACHERS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


# ------------------------------------------------------------------------------------------------
# block-removal recipes


def _from_levels(teacher: Topology, ins: list[list[int]], outs: list[list[int]], mid: int) -> Topology:
    """A topology from per-level input and output depths (shallowest level first; outputs of a level in
    output_blocks order)."""
    depth_out = [d for level in reversed(range(len(outs))) for d in outs[level]]  # output_blocks order
    return replace(teacher, channel_mult=teacher.channel_mult[:len(ins)], num_res_blocks=tuple(len(x) for x in ins),
                   transformer_depth=tuple(d for x in ins for d in x),
                   transformer_depth_output=tuple(reversed(depth_out)), transformer_depth_middle=mid)


def bk(teacher: Topology, size: str) -> Topology:
    """BK-SDM's removal (segmind's is the same): every down stage keeps its first resnet(+attention), every up
    stage its first and last; ``small`` also removes the middle block; ``tiny`` also removes the deepest level
    (its down stage, the previous level's down-sampler and its up stage) and the middle block."""
    levels = teacher.levels - (1 if size == "tiny" else 0)
    ins, outs = teacher.input_depths_by_level(), teacher.output_depths_by_level()
    return _from_levels(teacher, [ins[lv][:1] for lv in range(levels)],
                        [[outs[lv][0], outs[lv][-1]] for lv in range(levels)],
                        teacher.transformer_depth_middle if size == "base" else -2)


def sdxl_prune(teacher: Topology, *, ins: list[list[int]], outs: list[list[int]], mid: int) -> Topology:
    """An SDXL student written as the depth of every attention (per level, shallowest first)."""
    return _from_levels(teacher, ins, outs, mid)


def asdm(teacher: Topology, base: Topology, levels: tuple[int, ...]) -> Topology:
    """A-SDM's combined UNet (Table 2): the base student's ``levels`` (down and up) with the teacher's other
    levels and middle block. M1 = levels (0,) (Base dn0 + up3), M2 = levels (0, 1) (Base dn0,1 + up2,3)."""
    t_in, t_out = teacher.input_depths_by_level(), teacher.output_depths_by_level()
    b_in, b_out = base.input_depths_by_level(), base.output_depths_by_level()
    return _from_levels(teacher, [b_in[lv] if lv in levels else t_in[lv] for lv in range(teacher.levels)],
                        [b_out[lv] if lv in levels else t_out[lv] for lv in range(teacher.levels)],
                        teacher.transformer_depth_middle)


BK_BASE, BK_SMALL, BK_TINY = (bk(SD1, s) for s in ("base", "small", "tiny"))
BK_V2_BASE, BK_V2_SMALL, BK_V2_TINY = (bk(SD2, s) for s in ("base", "small", "tiny"))
#: SDXL students as the depth of every attention, per level (shallowest first): (inputs, outputs, middle depth)
SDXL_DEPTHS = {
    "ssd-1b": ([[0, 0], [2, 2], [4, 4]], [[0, 0, 0], [2, 1, 1], [4, 4, 10]], -1),
    "vega": ([[0, 0], [1, 1], [2, 2]], [[0, 0, 0], [1, 1, 1], [2, 2, 2]], -1),
    "koala-700m": ([[0], [2], [5]], [[0, 0], [2, 2], [5, 5]], -2),
    "koala-1b": ([[0], [2], [6]], [[0, 0], [2, 2], [6, 6]], 6),
}


def sdxl_student(teacher: Topology, name: str) -> Topology:
    ins, outs, mid = SDXL_DEPTHS[name]
    return sdxl_prune(teacher, ins=ins, outs=outs, mid=mid)


SSD_1B, VEGA, KOALA_700M, KOALA_1B = (sdxl_student(SDXL, n) for n in ("ssd-1b", "vega", "koala-700m", "koala-1b"))
#: SDXS-512-0.9: BK-Tiny of SD 2.1 whose level-0 attn1 is a cross-attention (ComfyUI's SD09_XS)
SDXS_09 = replace(BK_V2_TINY, disable_self_attn=(True, False, False))
#: SDXS-512-DreamShaper: BK-Tiny of SD 1.5 without attention at level 0
SDXS_DS = replace(BK_TINY, transformer_depth=(0, 1, 1), transformer_depth_output=(0, 0, 1, 1, 1, 1))

#: Which teacher transformer layers a student's shortened attention keeps, where the student was built here.
#: None of SSD-1B, Vega or KOALA publishes it (a documented choice, reported as such by the builder):
#: SSD-1B follows the one published estimate (furusu/SSD-1B-anime, cosine similarity of the released
#: weights against SDXL's: 10 -> 4 keeps 0, 1, 2, 6; 2 -> 1 keeps 0); otherwise the layers are spread evenly
#: from the first to the last (10 -> 2 keeps 0, 9; 10 -> 5 keeps 0, 2, 4, 7, 9).
KEPT_LAYERS = {"ssd-1b": {(10, 4): (0, 1, 2, 6), (2, 1): (0,)}}


def spread_layers(n_teacher: int, n_student: int) -> tuple[int, ...]:
    """``n_student`` of ``n_teacher`` layers spread evenly from the first to the last."""
    if n_student >= n_teacher:
        return tuple(range(n_teacher))
    if n_student == 1:
        return (0,)
    return tuple(round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student))


# ------------------------------------------------------------------------------------------------
# builder presets


@dataclass(frozen=True)
class Preset:
    name: str
    families: tuple[str, ...]
    make: Callable[[Topology, Topology | None], Topology]  # (teacher, base student) -> student structure
    counterparts: dict[str, str]  # family -> the public model with this structure
    source: str                   # where the recipe is published
    needs_base: bool = False
    asdm_levels: tuple[int, ...] = ()


def _bk_preset(size: str) -> Preset:
    return Preset(f"bk-{size}", ("sd1", "sd2"), lambda t, b: bk(t, size),
                  {"sd1": f"nota-ai/bk-sdm-{size}", "sd2": f"nota-ai/bk-sdm-v2-{size}"},
                  "BK-SDM (arXiv 2305.15798), copy rule of its kd_train_text_to_image.py")


def _sdxl_preset(name: str, counterpart: str, source: str) -> Preset:
    return Preset(name, ("sdxl",), lambda t, b: sdxl_student(t, name), {"sdxl": counterpart}, source)


def _asdm_preset(name: str, levels: tuple[int, ...]) -> Preset:
    return Preset(name, ("sd1", "sd2"), lambda t, b: asdm(t, b, levels), {}, "A-SDM (arXiv 2312.15516) Table 2",
                  needs_base=True, asdm_levels=levels)


PRESETS = {p.name: p for p in (
    _bk_preset("base"), _bk_preset("small"), _bk_preset("tiny"),
    _sdxl_preset("ssd-1b", "segmind/SSD-1B", "SSD-1B (arXiv 2401.02677), structure of its config"),
    _sdxl_preset("vega", "segmind/Segmind-Vega", "Segmind-Vega (arXiv 2401.02677), structure of its config"),
    _sdxl_preset("koala-700m", "etri-vilab/koala-700m", "KOALA (arXiv 2312.04005), structure of its config"),
    _sdxl_preset("koala-1b", "etri-vilab/koala-1b", "KOALA (arXiv 2312.04005), structure of its config"),
    _asdm_preset("asdm-m1", (0,)), _asdm_preset("asdm-m2", (0, 1)),
)}


# ------------------------------------------------------------------------------------------------
# public models


@dataclass(frozen=True)
class Rec:
    """Recommended settings in ComfyUI's KSampler terms."""
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    resolution: tuple[int, int]
    note: str = ""


@dataclass(frozen=True)
class Model:
    id: str
    structure: Topology
    params: int                     # published exact UNet parameter count (tests check the structure gives it)
    rec: Rec
    teacher: str | None = None      # None: this is a teacher
    url: str | None = None
    aliases: tuple[str, ...] = ()   # other names in file names that mean this model (fine-tunes, re-uploads)

    @property
    def family(self) -> str:
        return self.structure.family

    @property
    def is_teacher(self) -> bool:
        return self.teacher is None


_TEACHER = "teacher"
SEGMIND = Rec("dpmpp_2m", "karras", 25, 7.0, (512, 512), "long negative prompt recommended; best after fine-tuning "
                                                          "or a LoRA")
BKSDM = Rec("dpmpp_2m", "normal", 25, 7.5, (512, 512), "trained with PNDM (not in ComfyUI); dpmpp_2m at 25 steps is "
                                                        "the closest deterministic multistep choice")
KOALA = Rec("euler", "normal", 25, 7.5, (1024, 1024), "use a negative prompt")
KOALA_LIGHTNING = Rec("euler", "sgm_uniform", 10, 3.5, (1024, 1024), "trailing timestep spacing = sgm_uniform in "
                                                                      "ComfyUI")
SDXS = Rec("euler", "normal", 1, 1.0, (512, 512), "one step, no CFG; trained with a tiny VAE")
HF = "https://huggingface.co/"

MODELS: tuple[Model, ...] = (
    Model("SD 1.x (v1.4 / v1.5)", SD1, 859_520_964, Rec("dpmpp_2m", "karras", 25, 7.0, (512, 512), _TEACHER)),
    Model("SD 2.1-base", SD2, 865_910_724, Rec("dpmpp_2m", "karras", 25, 7.0, (512, 512), _TEACHER)),
    Model("SDXL 1.0 base", SDXL, 2_567_463_684, Rec("dpmpp_2m", "karras", 25, 7.0, (1024, 1024), _TEACHER)),
    Model("segmind/small-sd", BK_BASE, 579_384_964, SEGMIND, "SD 1.5 (Realistic Vision V4.0 as distillation teacher)",
          HF + "segmind/small-sd"),
    Model("segmind/tiny-sd", BK_TINY, 323_384_964, SEGMIND, "SD 1.5 (Realistic Vision V4.0 as distillation teacher)",
          HF + "segmind/tiny-sd", aliases=("portrait-finetuned",)),
    Model("nota-ai/bk-sdm-base", BK_BASE, 579_384_964, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-base"),
    Model("nota-ai/bk-sdm-small", BK_SMALL, 482_346_884, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-small"),
    Model("nota-ai/bk-sdm-tiny", BK_TINY, 323_384_964, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-tiny"),
    Model("nota-ai/bk-sdm-base-2m", BK_BASE, 579_384_964, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-base-2m"),
    Model("nota-ai/bk-sdm-small-2m", BK_SMALL, 482_346_884, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-small-2m"),
    Model("nota-ai/bk-sdm-tiny-2m", BK_TINY, 323_384_964, BKSDM, "SD 1.4", HF + "nota-ai/bk-sdm-tiny-2m"),
    Model("nota-ai/bk-sdm-v2-base", BK_V2_BASE, 583_480_964, BKSDM, "SD 2.1-base", HF + "nota-ai/bk-sdm-v2-base"),
    Model("nota-ai/bk-sdm-v2-small", BK_V2_SMALL, 485_787_524, BKSDM, "SD 2.1-base", HF + "nota-ai/bk-sdm-v2-small"),
    Model("nota-ai/bk-sdm-v2-tiny", BK_V2_TINY, 326_825_604, BKSDM, "SD 2.1-base", HF + "nota-ai/bk-sdm-v2-tiny"),
    Model("segmind/SSD-1B", SSD_1B, 1_331_334_404,
          Rec("euler", "normal", 30, 9.0, (1024, 1024), "use negative prompts; CFG about 9; other SDXL resolutions "
                                                        "work"),
          "SDXL 1.0", HF + "segmind/SSD-1B", aliases=("lcm-ssd-1b", "ssd-1b-anime")),
    Model("segmind/Segmind-Vega", VEGA, 745_225_604,
          Rec("uni_pc", "normal", 25, 9.0, (1024, 1024), "Segmind-VegaRT (an LCM-LoRA) gives 2-8 step sampling"),
          "SDXL 1.0", HF + "segmind/Segmind-Vega"),
    Model("etri-vilab/koala-700m", KOALA_700M, 782_822_724, KOALA, "SDXL 1.0", HF + "etri-vilab/koala-700m",
          aliases=("koala-700m-llava-cap",)),
    Model("etri-vilab/koala-1b", KOALA_1B, 1_161_184_324, KOALA, "SDXL 1.0", HF + "etri-vilab/koala-1b",
          aliases=("koala-1b-llava-cap",)),
    Model("etri-vilab/koala-lightning-700m", KOALA_700M, 782_822_724, KOALA_LIGHTNING,
          "SDXL 1.0 (SDXL-Lightning as distillation teacher)", HF + "etri-vilab/koala-lightning-700m"),
    Model("etri-vilab/koala-lightning-1b", KOALA_1B, 1_161_184_324, KOALA_LIGHTNING,
          "SDXL 1.0 (SDXL-Lightning as distillation teacher)", HF + "etri-vilab/koala-lightning-1b"),
    Model("IDKiro/sdxs-512-0.9", SDXS_09, 328_177_284, SDXS, "SD 2.1-base (inferred)", HF + "IDKiro/sdxs-512-0.9"),
    Model("IDKiro/sdxs-512-dreamshaper", SDXS_DS, 315_746_244, SDXS, "SD 1.5 (DreamShaper)",
          HF + "IDKiro/sdxs-512-dreamshaper"),
)
