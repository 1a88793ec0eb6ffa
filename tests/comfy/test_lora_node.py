"""DistilledLoraLoader against a real ComfyUI: tiny students built through ComfyUI's own classes, LoRAs
generated in every format, weights compared after ComfyUI patched them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from .._lora_fixtures import FORMATS, LDM_FORMATS, expected_bk, lora_for

STRENGTH = 0.7


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    from distilled_unets.models.structure import names
    from distilled_unets.nodes import lora as node

    from . import _tiny_models as tm

    return tm, names, node


_BUILT = {}


@pytest.fixture(scope="module", autouse=True)
def _release_built():
    """Drop the module's patchers at its end (left to interpreter exit, ComfyUI 0.3.64's ModelPatcher.__del__
    finds its modules torn down and prints "Exception ignored ... ON_DETACH")."""
    yield
    _BUILT.clear()


def build(tm, topo_name):
    if topo_name not in _BUILT:
        from distilled_unets.models.structure import structures as S

        topo = {"base": S.BK_BASE, "small": S.BK_SMALL, "tiny": S.BK_TINY, "teacher": S.SD1}[topo_name]
        _BUILT[topo_name] = tm.build("sd15", topo, model_channels=32, seed=3)
    return _BUILT[topo_name]


def topology(patcher):
    from distilled_unets.nodes.host.unet import topology_of

    return topology_of(patcher)


def weights(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def patched_weights(patcher):
    patcher.patch_model()
    try:
        return weights(patcher)
    finally:
        patcher.unpatch_model()


def module_shapes(names, patcher, layout):
    sd = patcher.model.state_dict()
    mp = names.module_map(topology(patcher))
    return {(v if layout == "ldm" else k): tuple(sd[f"diffusion_model.{v}.weight"].shape) for k, v in mp.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_equals_manual_merge(host, fmt):
    tm, names, node = host
    model = build(tm, "tiny")
    before = weights(model)
    layout = "ldm" if fmt in LDM_FORMATS else "diffusers"
    tensors, meta, acfg, deltas = lora_for(module_shapes(names, model, layout), fmt, seed=11)
    new, _, report = node.apply_lora(model, None, tensors, meta, STRENGTH, 1.0, adapter_config=acfg)
    assert not model.patches, "the input model must not be patched"
    after = patched_weights(new)
    smap = names.module_map(topology(model))
    touched = set()
    for path, d in deltas.items():
        key = f"diffusion_model.{path if layout == 'ldm' else smap[path]}.weight"
        torch.testing.assert_close(after[key], before[key] + STRENGTH * d, rtol=1e-5, atol=1e-6)
        touched.add(key)
    for key in before:
        if key not in touched:
            assert torch.equal(after[key], before[key]), key
    assert f"applied {len(deltas)} of {len(deltas)} modules" in report
    assert torch.equal(weights(model)["diffusion_model.out.2.weight"], before["diffusion_model.out.2.weight"])


@pytest.mark.parametrize("student", ["base", "small", "tiny"])
@pytest.mark.parametrize("fmt", ["kohya", "kohya-ldm", "peft"])
def test_teacher_lora_lands_on_corresponding_student_blocks(host, student, fmt):
    tm, names, node = host
    teacher, model = build(tm, "teacher"), build(tm, student)
    layout = "ldm" if fmt in LDM_FORMATS else "diffusers"
    t_shapes = module_shapes(names, teacher, layout)
    tensors, meta, acfg, deltas = lora_for(t_shapes, fmt, seed=5)  # a distinct delta on every teacher module
    before = weights(model)
    new, _, report = node.apply_lora(model, None, tensors, meta, STRENGTH, 1.0)
    after = patched_weights(new)

    cfg = topology(model)
    smap = names.module_map(cfg)
    inv = names.ldm_module_map(topology(teacher))
    expected = {}
    for path, d in deltas.items():
        s = expected_bk(inv[path] if layout == "ldm" else path, cfg)
        if s is not None:
            key = f"diffusion_model.{smap[s]}.weight"
            assert key not in expected
            expected[key] = d
    assert expected
    mismatched = []
    for key, w in before.items():
        if key in expected and expected[key].shape == w.shape:
            torch.testing.assert_close(after[key], w + STRENGTH * expected[key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[key], w), f"{key} was patched but no teacher module belongs there"
            if key in expected:
                mismatched.append(key)
    applied = len(expected) - len(mismatched)
    assert f"applied {applied} of {len(deltas)} modules (LoRA names the teacher's blocks" in report
    assert f"dropped, block removed in the student: {len(deltas) - len(expected)}" in report
    if mismatched:
        assert f"dropped, shape mismatch: {len(mismatched)}" in report


def test_comfyui_own_loader_puts_teacher_pair_2_on_the_wrong_block(host):
    """The bug this node exists for, measured on the same file: ComfyUI matches by name."""
    import comfy.sd

    tm, names, node = host
    teacher, model = build(tm, "teacher"), build(tm, "base")
    shapes = module_shapes(names, teacher, "diffusers")
    attn = {k: v for k, v in shapes.items() if k.endswith("attn1.to_q")}
    tensors, _, _, deltas = lora_for(attn, "kohya", seed=8)
    target = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"  # student up 1 pair 1
    before = weights(model)[target]
    theirs, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    ours, _, report = node.apply_lora(model, None, tensors, {}, 1.0, 0.0)
    got_theirs, got_ours = patched_weights(theirs)[target], patched_weights(ours)[target]
    pair1 = deltas["up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"]
    pair2 = deltas["up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(got_theirs, before + pair1)  # teacher pair 1 on the teacher's pair-2 block
    torch.testing.assert_close(got_ours, before + pair2)
    assert "block removed in the student: 6" in report  # down pair 1 (x3) + up pair 1 (x3)


def test_multi_unet_model_gets_one_mapping_per_unet(host):
    tm, names, node = host
    from distilled_unets.models.patches.multi_unet import KEY_PREFIX
    from distilled_unets.nodes.sampling import SwitchPoint, make_multi_unet_model

    teacher, early, late = build(tm, "teacher"), build(tm, "tiny"), build(tm, "base")
    multi = make_multi_unet_model(early, late, SwitchPoint("sigma", 5.0), node="MultiUNetModel")
    path = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v"  # teacher level 2, pair 2
    tensors, _, _, deltas = lora_for({path: module_shapes(names, teacher, "diffusers")[path]}, "kohya", seed=2)
    new, _, report = node.apply_lora(multi, None, tensors, {}, 1.0, 0.0)
    assert not multi.patches
    # base keeps 4 levels: up_blocks.1 pair 1; tiny lost level 3: up_blocks.0 pair 1
    assert list(new.patches) == ["diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"]
    (stage,) = [m for k, ms in new.additional_models.items() if k.startswith(KEY_PREFIX) for m in ms]
    assert list(stage.patches) == ["diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]
    assert "early stage" in report
    early_orig = [m for k, ms in multi.additional_models.items() if k.startswith(KEY_PREFIX) for m in ms][0]
    assert not early_orig.patches


def test_bad_inputs_raise_lora_error(host, tmp_path):
    tm, names, node = host
    from distilled_unets.models.errors import LoraError

    model = build(tm, "tiny")
    sdxl = lora_for({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (64, 2048)}, "kohya")[0]
    with pytest.raises(LoraError, match="SDXL"):
        node.apply_lora(model, None, sdxl, {}, 1.0, 1.0)
    te_only = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(LoraError, match="no UNet keys"):
        node.apply_lora(model, None, te_only, {}, 1.0, 1.0)
    assert not model.patches

    good = tmp_path / "good.safetensors"
    save_file(sdxl, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraError, match="corrupt or truncated") as e:
        node.read_lora_file(str(bad))
    assert "DistilledLoraLoader" in str(e.value) and "lora_name" in str(e.value)
    assert f"(file: {bad})" in str(e.value)
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match="not a .safetensors") as e:
        node.read_lora_file(str(ckpt))
    assert f"(file: {ckpt})" in str(e.value)


def test_node_execute_through_folder_paths(host, tmp_path):
    import folder_paths

    tm, names, node = host
    model = build(tm, "tiny")
    tensors, meta, _, deltas = lora_for(module_shapes(names, model, "diffusers"), "peft", seed=4)
    save_file(tensors, str(tmp_path / "student_peft.safetensors"), metadata=meta)
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    out = node.DistilledLoraLoader.execute(model=model, lora_name="student_peft.safetensors",
                                           strength_model=1.0, strength_clip=1.0)
    new, clip, report = out.result
    assert clip is None and len(new.patches) == len(deltas)
    assert report in str(out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui)
