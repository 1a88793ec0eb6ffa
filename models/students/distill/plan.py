"""What the loss supervises and what trains: loss weights (BK-SDM, segmind presets, or the user's own), the
feature points paired between a teacher and a student topology (BK-SDM's stage outputs, generalised; A-SDM's
mid block), the block map a run uses and the student parameters that train. Shared by the node and the
headless trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...structure import blockmap as bmod
from ...structure.topology import Topology
from .errors import DistillError


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms. ``mid`` and ``vgg`` default (None) to ``feat`` and ``out``.

    ``mid`` (A-SDM's mid-block supervision) is one more feature-KD term of the same kind, so it gets the
    feature weight; ``vgg`` supervises the same output as the output-KD term (in a semantic space), so it
    gets the output weight. A-SDM publishes neither.
    """

    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    mid: float | None = None
    vgg: float | None = None

    @property
    def mid_weight(self) -> float:
        return self.feat if self.mid is None else self.mid

    @property
    def vgg_weight(self) -> float:
        return self.out if self.vgg is None else self.vgg

    def describe(self) -> str:
        return (f"task {self.task:g}, output KD {self.out:g}, feature KD {self.feat:g}, "
                f"mid {self.mid_weight:g}, VGG {self.vgg_weight:g}")


#: BK-SDM (kd_train_text_to_image.py: lambda_sd = lambda_kd_output = lambda_kd_feat = 1) and segmind
#: distill-sd (task 1, output 0.5, features 0.5).
PRESETS = {"bk-sdm": LossWeights(1.0, 1.0, 1.0), "segmind": LossWeights(1.0, 0.5, 0.5)}

#: samples BK-SDM's released checkpoints saw: batch 256 x 50K steps (kd_train_text_to_image.py, README)
BK_SDM_SAMPLES = 256 * 50_000


def loss_weights(preset: str, task: float = 1.0, out: float = 1.0, feat: float = 1.0, mid: float = 1.0,
                 vgg: float = 1.0) -> LossWeights:
    """The weights of a preset (``bk-sdm``, ``segmind``: mid and VGG follow the feature and output weights), or
    ``custom``: the five weights given."""
    if preset == "custom":
        return LossWeights(task, out, feat, mid, vgg)
    if preset not in PRESETS:
        raise DistillError(f"loss weights {preset!r}", f"use one of {sorted(PRESETS)} or custom",
                           input_name="loss_weights")
    base = PRESETS[preset]
    return LossWeights(base.task, base.out, base.feat)


def parse_loss_weights(spec: str) -> LossWeights:
    """A command-line spelling: a preset name, or ``TASK,OUT,FEAT[,MID[,VGG]]`` numbers."""
    if spec in PRESETS:
        return loss_weights(spec)
    try:
        vals = [float(x) for x in spec.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4, 5):
        raise DistillError(f"the loss weights are {spec!r}", f"give {', '.join(sorted(PRESETS))}, or "
                           "TASK,OUT,FEAT[,MID[,VGG]] numbers", input_name="loss_weights")
    return LossWeights(*vals)


# ------------------------------------------------------------------------------------------------
# what trains
# ------------------------------------------------------------------------------------------------

#: the choices of which student weights train (the node's spelling; the trainer's flags map onto them)
TRAIN_MODES = ("all", "student blocks only", "changed blocks only")


def choose_block_map(attached: bmod.BlockMap | None, teacher: Topology,
                     student: Topology) -> tuple[bmod.BlockMap, str]:
    """(block map, where it came from): the student's own (from Build Student UNet or its file) when it
    describes these two structures, else one derived from them."""
    if attached is not None and attached.student.signature() == student.signature() and \
            attached.teacher.signature()[1:] == teacher.signature()[1:]:
        return attached, "the student's block map"
    return bmod.derive(teacher, student), "derived from the two structures"


def trainable_filter(block_map: bmod.BlockMap, mode: str) -> tuple[Callable[[str], bool], set[str]]:
    """(``trainable(parameter name)``, the units that train) for one of :data:`TRAIN_MODES`."""
    if mode not in TRAIN_MODES:
        raise DistillError(f"train is {mode!r}", f"use one of {', '.join(TRAIN_MODES)}", input_name="train")
    units = set(block_map.trainable_units(mode))
    return (lambda name: block_map.unit_of(name) in units), units


# ------------------------------------------------------------------------------------------------
# feature points from two topologies
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    res: tuple[tuple[int, ...], ...]    # per level: input_blocks index of each res block
    res_depth: tuple[tuple[int, ...], ...]
    down: tuple[int | None, ...]        # per level: input_blocks index of the downsampler
    out: tuple[tuple[int, ...], ...]    # per level: output_blocks indices
    out_depth: tuple[tuple[int, ...], ...]
    mid_layers: int                     # 0: no middle block


def unet_layout(t: Topology) -> _Layout:
    res, res_depth, down = [], [], []
    k = 1
    depths = t.input_depths_by_level()
    for level in range(t.levels):
        n = t.num_res_blocks[level]
        res.append(tuple(range(k, k + n)))
        res_depth.append(tuple(depths[level]))
        k += n
        if level < t.levels - 1:
            down.append(k)
            k += 1
        else:
            down.append(None)
    out, out_depth = [None] * t.levels, [None] * t.levels
    k = 0
    depths_out = t.output_depths()  # output_blocks order: deepest level first
    for level in reversed(range(t.levels)):
        n = t.num_res_blocks[level] + 1
        out[level] = tuple(range(k, k + n))
        out_depth[level] = tuple(depths_out[k:k + n])
        k += n
    mid = {-2: 0, -1: 1}.get(t.transformer_depth_middle, 3)
    return _Layout(tuple(res), tuple(res_depth), tuple(down), tuple(out), tuple(out_depth), mid)


def _down_out(lay: _Layout, level: int) -> str:
    """Module whose output is the down stage's output (BK-SDM ``down_blocks.i`` output[0])."""
    if lay.down[level] is not None:
        return f"input_blocks.{lay.down[level]}.0"
    last = lay.res[level][-1]
    return f"input_blocks.{last}.{1 if lay.res_depth[level][-1] > 0 else 0}"


def _up_out(lay: _Layout, level: int) -> str:
    last = lay.out[level][-1]
    layer = (1 if lay.out_depth[level][-1] > 0 else 0) + (1 if level > 0 else 0)
    return f"output_blocks.{last}.{layer}"


@dataclass(frozen=True)
class FeaturePoint:
    """One feature-KD pair: hook the output of ``teacher`` / ``student`` (module paths in the UNet)."""

    name: str
    teacher: str
    student: str
    label: str  # in BK-SDM's diffusers vocabulary
    kind: str = "stage"  # "stage" | "mid"


@dataclass(frozen=True)
class FeaturePlan:
    points: tuple[FeaturePoint, ...]
    skipped: tuple[str, ...]

    def report_lines(self) -> list[str]:
        lines = [f"feature KD ({len(self.points)} points): " + "; ".join(p.label for p in self.points)]
        lines += [f"not paired: {s}" for s in self.skipped]
        return lines


def feature_plan(teacher: Topology, student: Topology, *, stages: bool = True, mid: bool = False) -> FeaturePlan:
    """BK-SDM's feature pairing generalised to any teacher/student topology pair (see module docstring)."""
    T, S = unet_layout(teacher), unet_layout(student)
    pts: list[FeaturePoint] = []
    skipped: list[str] = []
    common = min(teacher.levels, student.levels)
    if stages:
        ups = []
        for level in range(common):
            tc, sc = teacher.level_channels(level), student.level_channels(level)
            t_up, s_up = teacher.levels - 1 - level, student.levels - 1 - level
            if tc != sc:
                skipped.append(f"level {level}: teacher has {tc} channels, student {sc}")
                continue
            t_down, s_down = T.down[level] is not None, S.down[level] is not None
            if t_down == s_down:
                pts.append(FeaturePoint(f"down.{level}", _down_out(T, level), _down_out(S, level),
                                        f"down_blocks.{level}"))
            elif t_down and not s_down:
                # BK-SDM-Tiny: the student's deepest level lost its downsampler; pair before downsampling
                ti, si = len(T.res[level]) - 1, len(S.res[level]) - 1
                if T.res_depth[level][-1] > 0 and S.res_depth[level][-1] > 0:
                    pts.append(FeaturePoint(
                        f"down.{level}.proj_out", f"input_blocks.{T.res[level][-1]}.1.proj_out",
                        f"input_blocks.{S.res[level][-1]}.1.proj_out",
                        f"down_blocks.{level}.attentions.{ti}.proj_out ↔ down_blocks.{level}.attentions.{si}"
                        ".proj_out"))
                else:
                    pts.append(FeaturePoint(
                        f"down.{level}.resnet", f"input_blocks.{T.res[level][-1]}.0",
                        f"input_blocks.{S.res[level][-1]}.0",
                        f"down_blocks.{level}.resnets.{ti} ↔ down_blocks.{level}.resnets.{si}"))
            else:
                skipped.append(f"down_blocks.{level}: the student downsamples where the teacher does not")
            label = f"up_blocks.{t_up}" if t_up == s_up else f"up_blocks.{t_up} ↔ up_blocks.{s_up}"
            ups.append(FeaturePoint(f"up.{level}", _up_out(T, level), _up_out(S, level), label))
        pts.extend(sorted(ups, key=lambda p: -int(p.name.split(".")[1])))  # up_blocks order
        for level in range(common, teacher.levels):
            skipped.append(f"teacher down_blocks.{level} / up_blocks.{teacher.levels - 1 - level}: the student "
                           "has no such level")
    if mid:
        if T.mid_layers == 0 or S.mid_layers == 0:
            who = "teacher" if T.mid_layers == 0 else "student"
            skipped.append(f"mid: the {who} has no mid block (mid-block supervision left out)")
        elif teacher.levels != student.levels or (teacher.level_channels(teacher.levels - 1)
                                                  != student.level_channels(student.levels - 1)):
            skipped.append("mid: the two mid blocks work at different shapes (left out)")
        else:
            pts.append(FeaturePoint("mid", f"middle_block.{T.mid_layers - 1}", f"middle_block.{S.mid_layers - 1}",
                                    "mid_block", kind="mid"))
    return FeaturePlan(tuple(pts), tuple(skipped))
