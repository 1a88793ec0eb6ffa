"""BuildStudentUNet and SaveStudentUNet in a real ComfyUI, against diffusers' UNet2DConditionModel filled by the
published copy rules (written out here, independently of models/structure/blockmap.py)."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.topology import diffusers_config
from safetensors import safe_open
from safetensors.torch import save_file

from ..layouts import diffusers_model, tiny_config
from .test_loader import _inputs

#: forward-pass tolerance against diffusers: ComfyUI's UNet and diffusers' differ by ~1e-6 (relative, fp32) on any
#: UNet, whatever its weights (the loader tests measure it); the copy itself is checked bit-exact on the weights.
TOL = 1e-5


def bk_copy_rule(key: str, size: str) -> str:
    """BK-SDM's initialisation, written out as its kd_train script copies names: down stages keep pair 0, up
    stages keep pairs 0 and 2 (student 1 <- teacher 2), tiny shifts up_blocks by one."""
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        i += 1 if size == "tiny" else 0
        return f"up_blocks.{i}.{kind}.{2 if j == 1 else j}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(upsamplers.*)", key)
    if m and size == "tiny":
        return f"up_blocks.{int(m.group(1)) + 1}.{m.group(2)}"
    return key


def asdm_copy_rule(key: str, base_levels: tuple[int, ...], levels: int = 4) -> str:
    """A-SDM's combination: the base student's down blocks ``base_levels`` and the mirrored up blocks."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.", key)
    if m:
        level = int(m.group(2)) if m.group(1) == "down" else levels - 1 - int(m.group(2))
        if level in base_levels:
            return "base"
    return "teacher"


@functools.lru_cache(maxsize=None)
def _teacher(family: str, seed: int = 0):
    t = {"sd1": S.SD1, "sd2": S.SD2, "sdxl": S.SDXL}[family]
    cfg = tiny_config(diffusers_config(t))
    return cfg, diffusers_model(cfg, seed=seed)


def _load(path, sd):
    from distilled_unets.nodes.host.unet import load_distilled_unet

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return load_distilled_unet(str(path))[0]


def _compare(patcher, dm, cfg):
    x, t, ctx, added, y = _inputs(cfg, dm)
    with torch.no_grad():
        ref = dm(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        got = patcher.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family,size", [("sd1", "base"), ("sd1", "small"), ("sd1", "tiny"), ("sd2", "tiny")])
def test_bk_student_equals_diffusers_bk_copy(family, size, tmp_path):
    from distilled_unets.nodes.students import BuildStudentUNet

    tcfg, tm = _teacher(family)
    teacher = _load(tmp_path / "teacher.safetensors", tm.state_dict())
    before = {k: v.clone() for k, v in teacher.model.diffusion_model.state_dict().items()}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = BuildStudentUNet.execute(teacher=teacher, preset=f"bk-{size}")
    student, info = out.args
    # the diffusers student of the same structure, filled from the diffusers teacher by BK-SDM's rule
    scfg = tiny_config(diffusers_config(getattr(S, f"BK_{'V2_' if family == 'sd2' else ''}{size.upper()}")))
    sm = diffusers_model(scfg)
    tsd = tm.state_dict()
    sm.load_state_dict({k: tsd[bk_copy_rule(k, size)] for k in sm.state_dict()})
    # bit-exact: the built student holds exactly the weights of the diffusers student loaded by the loader
    ref = _load(tmp_path / "diffusers-student.safetensors", sm.state_dict()).model.diffusion_model.state_dict()
    got = student.model.diffusion_model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # and computes what diffusers computes
    rel = _compare(student, sm, scfg)
    assert rel <= TOL, rel
    assert f"Tensors: {len(student.model.diffusion_model.state_dict())} of " in info and "(100%)" in info
    assert ", 0 new" in info and "Not distilled yet" in info
    # the teacher was only read
    assert not teacher.patches
    for k, v in teacher.model.diffusion_model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("preset,levels", [("asdm-m1", (0,)), ("asdm-m2", (0, 1))])
def test_asdm_combination_equals_diffusers(preset, levels, tmp_path):
    from distilled_unets.nodes.students import build_student

    tcfg, tm = _teacher("sd1")
    base_cfg = dict(tcfg, layers_per_block=1)
    bm_ = diffusers_model(base_cfg, seed=7)  # an independently "distilled" base student
    teacher = _load(tmp_path / "t.safetensors", tm.state_dict())
    base = _load(tmp_path / "b.safetensors", bm_.state_dict())
    student, info = build_student(teacher, preset, base)
    mcfg = dict(tcfg, layers_per_block=[1 if lv in levels else 2 for lv in range(4)])
    mm = diffusers_model(mcfg)
    src = {"teacher": tm.state_dict(), "base": bm_.state_dict()}
    mm.load_state_dict({k: src[asdm_copy_rule(k, levels)][k] for k in mm.state_dict()})
    ref = _load(tmp_path / "m.safetensors", mm.state_dict()).model.diffusion_model.state_dict()
    got = student.model.diffusion_model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert _compare(student, mm, mcfg) <= TOL
    assert "from the base student" in info
    bm = student.get_attachment("distilled_unets.block_map")
    assert bm.trainable_units("student blocks only")  # A-SDM's incubation trains these


def test_sdxl_preset_keeps_the_chosen_layers_and_saves_round_trip(tmp_path, models_dir):
    from distilled_unets.nodes.loaders import DistilledUNetLoader
    from distilled_unets.nodes.students import BuildStudentUNet, SaveStudentUNet

    _, tm = _teacher("sdxl")
    teacher = _load(tmp_path / "xl.safetensors", tm.state_dict())
    student, info = BuildStudentUNet.execute(teacher=teacher, preset="ssd-1b", teacher_name="myXL").args
    assert "Kept transformer layers (a documented choice" in info and "10 -> 4: teacher layers [0, 1, 2, 6]" in info
    tsd, ssd = teacher.model.diffusion_model.state_dict(), student.model.diffusion_model.state_dict()
    # level 2's first down attention: student layer 3 is teacher layer 6
    k = "input_blocks.7.1.transformer_blocks.{}.attn1.to_q.weight"
    assert torch.equal(ssd[k.format(3)], tsd[k.format(6)])
    path = SaveStudentUNet.execute(model=student, filename_prefix="students/ssd", dtype="fp32").args[0]
    assert path.endswith("ssd_00001_.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["modelspec.predict_key"] == "epsilon" and "distilled_unets.block_map" in meta
    assert all(k.startswith("model.diffusion_model.") for k in keys)  # ComfyUI ModelSave's layout
    loaded, text = DistilledUNetLoader.execute(unet_name="students/ssd_00001_.safetensors", weight_dtype="default",
                                               prediction="auto").args
    assert "preset ssd-1b from teacher myXL" in text and "teacher LoRAs map by it exactly" in text
    lsd = loaded.model.diffusion_model.state_dict()
    assert lsd.keys() == ssd.keys() and all(torch.equal(lsd[k], ssd[k]) for k in ssd)  # bit-exact
    bm = loaded.get_attachment("distilled_unets.block_map")
    assert bm.units == student.get_attachment("distilled_unets.block_map").units
    # a second save never replaces the first
    again = SaveStudentUNet.execute(model=student, filename_prefix="students/ssd", dtype="fp16").args[0]
    assert again.endswith("ssd_00002_.safetensors")


def test_teacher_lora_lands_exactly_where_the_saved_block_map_says(tmp_path, models_dir):
    from distilled_unets.models.structure import names
    from distilled_unets.nodes import lora as node
    from distilled_unets.nodes.host.unet import topology_of
    from distilled_unets.nodes.loaders import DistilledUNetLoader
    from distilled_unets.nodes.students import BuildStudentUNet, SaveStudentUNet

    from .._lora_fixtures import lora_for

    _, tm = _teacher("sdxl")
    teacher = _load(tmp_path / "xl.safetensors", tm.state_dict())
    student = BuildStudentUNet.execute(teacher=teacher, preset="koala-700m").args[0]
    SaveStudentUNet.execute(model=student, filename_prefix="k", dtype="fp32")
    loaded = DistilledUNetLoader.execute(unet_name="k_00001_.safetensors", weight_dtype="default",
                                         prediction="auto").args[0]
    t_topo = topology_of(teacher)
    tsd = teacher.model.diffusion_model.state_dict()
    mods = {ld: tuple(tsd[f"{ld}.weight"].shape) for ld in names.module_map(t_topo).values()
            if ld.endswith(("attn1.to_q", "attn2.to_v", "conv1")) or ld.endswith("in_layers.2")}
    tensors, meta, _, deltas = lora_for(mods, "kohya-ldm", seed=3)
    before = {k: v.clone() for k, v in loaded.model.diffusion_model.state_dict().items()}
    new, _, report = node.apply_lora(loaded, None, tensors, meta, 1.0, 0.0)
    bm = loaded.get_attachment("distilled_unets.block_map")
    expected = {}
    for t_mod, d in deltas.items():
        s_mod, certainty, _ = bm.student_module(t_mod)
        if s_mod is not None:
            assert certainty == "certain"  # a student built here: every correspondence is known
            expected[f"{s_mod}.weight"] = d
    assert "held back" not in report and expected
    new.patch_model()
    try:
        after = {k: v.clone() for k, v in new.model.diffusion_model.state_dict().items()}
    finally:
        new.unpatch_model()
    for k, w in before.items():
        if k in expected:
            torch.testing.assert_close(after[k], w + expected[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[k], w), k
    # against the published KOALA-700M (no block map), the same LoRA holds those blocks back as uncertain
    from distilled_unets.models.errors import LoraError

    plain = _load(tmp_path / "k.safetensors", {k: v for k, v in student.model.diffusion_model.state_dict().items()})
    with pytest.raises(LoraError, match="held back, teacher correspondence uncertain"):
        node.apply_lora(plain, None, tensors, meta, 1.0, 0.0)


def test_v_prediction_teacher_makes_a_v_prediction_file(tmp_path, models_dir):
    from comfy.model_base import ModelType
    from distilled_unets.nodes.loaders import DistilledUNetLoader
    from distilled_unets.nodes.students import build_student, save_unet

    _, tm = _teacher("sd2")
    path = tmp_path / "sd2v-768-v.safetensors"  # the file name says v-prediction
    teacher = _load(path, tm.state_dict())
    assert teacher.model.model_type == ModelType.V_PREDICTION
    student, _ = build_student(teacher, "bk-small")
    assert student.model.model_type == ModelType.V_PREDICTION
    saved = save_unet(student, "v2s", "bf16")
    with safe_open(saved, "pt") as f:
        assert f.metadata()["modelspec.predict_key"] == "v" and "v_pred" in f.keys()
    loaded, text = DistilledUNetLoader.execute(unet_name="v2s_00001_.safetensors", weight_dtype="default",
                                               prediction="auto").args
    assert loaded.model.model_type == ModelType.V_PREDICTION and "distilled_unets.prediction_type" in text


@pytest.mark.parametrize("case,input_name,match", [
    ("sdxl-on-sd1", "preset", "for SDXL teachers, but the teacher is SD 1.x"),
    ("asdm-no-base", "base_student", "no base_student is connected"),
    ("asdm-sdxl-base", "base_student", "base_student is SDXL"),
    ("asdm-wrong-structure", "base_student", "not BK-Base-structured"),
    ("student-as-teacher", "teacher", "not a full SD 1.x UNet"),
])
def test_bad_pairings(case, input_name, match, tmp_path):
    from distilled_unets.models.errors import PackError
    from distilled_unets.nodes.students import BuildStudentUNet

    from . import _tiny_models as tests

    sd1 = tests.build("sd15", S.SD1, seed=1)
    kw = {"teacher": sd1, "preset": "asdm-m1"}
    if case == "sdxl-on-sd1":
        kw["preset"] = "koala-700m"
    elif case == "asdm-sdxl-base":
        kw["base_student"] = tests.build("sdxl", S.KOALA_700M, seed=2)
    elif case == "asdm-wrong-structure":
        kw["base_student"] = tests.build("sd15", S.BK_TINY, seed=2)
    elif case == "student-as-teacher":
        kw.update(teacher=tests.build("sd15", S.BK_SMALL, seed=2), preset="bk-tiny")
    with pytest.raises(PackError, match=match) as e:
        BuildStudentUNet.execute(**kw)
    assert str(e.value).startswith(f"[BuildStudentUNet, input '{input_name}']") and "Fix:" in str(e.value)


def test_student_of_a_patched_teacher_takes_the_patched_weights(tmp_path):
    """A LoRA merged on the teacher MODEL is part of what the student inherits; the teacher stays unpatched."""
    import comfy.model_management as mm
    from distilled_unets.nodes.students import build_student

    from . import _tiny_models as tests

    teacher = tests.build("sd15", S.SD1, seed=1)
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    base_w = teacher.model.state_dict()[key].clone()
    delta = torch.full_like(base_w, 0.25)
    patched = teacher.clone()
    patched.add_patches({key: (delta,)}, 1.0)
    student, _ = build_student(patched, "bk-base")
    torch.testing.assert_close(student.model.state_dict()[key], base_w + delta)
    # ComfyUI keeps the patched clone loaded (as after ModelSave); unloading restores the teacher's own weights
    mm.unload_all_models()
    assert not teacher.patches and torch.equal(teacher.model.state_dict()[key], base_w)
