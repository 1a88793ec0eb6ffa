# ruff: noqa: T201  (the held-out curves are printed; see them with -s)
"""CLME-CondConv students end to end in a real ComfyUI: built from a teacher, identical before training (in fp32, fp16
and bf16), distilled, saved and loaded back, refused by ComfyUI's own loader, and reported as not LoRA-mappable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distilled_unets.models.structure import structures as S

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def built():
    from distilled_unets.nodes.students import build_student

    from . import _tiny_models as tm

    with torch.inference_mode():  # as the executor runs nodes
        teacher = tm.build("sd15", S.SD1, model_channels=32, seed=31)
        plain, _ = build_student(teacher, "bk-small")
        cc, info = build_student(teacher, "bk-small", condconv_experts=2)
    return tm, teacher, plain, cc, info


def _forward(patcher, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 8, 768, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, timesteps=torch.tensor([900.0, 500.0, 20.0][:batch]), context=ctx)


def test_built_student_is_identical_until_trained_and_inherits_the_merged_layers(built):
    from distilled_unets.nodes.host.condconv import ComfyCondConv2d

    tm, teacher, plain, cc, info = built
    unet = cc.model.diffusion_model
    swapped = [n for n, m in unet.named_modules() if isinstance(m, ComfyCondConv2d)]
    # the shallowest down stage's resnet and the two up resnets of level 0: conv1 and conv2 each
    assert sorted(swapped) == sorted(["input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3",
                                      "output_blocks.6.0.in_layers.2", "output_blocks.6.0.out_layers.3",
                                      "output_blocks.7.0.in_layers.2", "output_blocks.7.0.out_layers.3"])
    a, b = _forward(plain), _forward(cc)
    assert ((a - b).norm() / a.norm()).item() <= 1e-5  # identity at init (fp32 rounding of the expert mix)
    # cross-layer: expert 2 of the student's level-0 down conv1 is the teacher's merged resnet's conv1, verbatim
    tsd = teacher.model.diffusion_model.state_dict()
    m = unet.get_submodule("input_blocks.1.0.in_layers.2")
    assert torch.equal(m.weight[1], tsd["input_blocks.2.0.in_layers.2.weight"])
    assert torch.equal(m.routing_weight, torch.zeros_like(m.routing_weight))
    assert "CondConv (A-SDM CLME-CondConv): 6 3x3 convolutions" in info
    assert "teacher input_blocks.2.0.in_layers.2" in info
    recipe = cc.get_attachment("distilled_unets.recipe")
    assert recipe["condconv"]["experts"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_student_is_identical_at_init(tm, dtype):
    """A teacher in fp16/bf16 (ComfyUI's GPU default) gives a CondConv student whose experts sum to the plain
    student's kernels exactly: run in that dtype (CPU half-precision kernels), it computes what the plain student
    computes, within 1e-3 of the output's largest value (in fact bit for bit on the CPU), at batch 1 and 3."""
    from distilled_unets.nodes.students import build_student

    with torch.inference_mode():
        teacher = tm.build("sd15", S.SD1, model_channels=32, seed=31)
        teacher.model.diffusion_model.to(dtype)
        plain, _ = build_student(teacher, "bk-small")
        cc, info = build_student(teacher, "bk-small", condconv_experts=2)
        assert f"for an exact identity in {str(dtype)[6:]}" in info
        outs = []
        for student in (plain, cc):
            unet = student.model.diffusion_model
            unet.to(dtype)
            unet.dtype = dtype  # ComfyUI's UNetModel casts its input to this
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, 4, 16, 16, generator=g).to(dtype)
            ctx = torch.randn(3, 8, 768, generator=g).to(dtype)
            t = torch.tensor([900.0, 500.0, 20.0])
            outs.append([unet(x[:n], timesteps=t[:n], context=ctx[:n]).float() for n in (1, 3)])
    for a, b in zip(*outs):
        assert torch.isfinite(a).all() and a.abs().max() > 0
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_save_load_bit_exact_and_comfyui_refuses_the_file(built, models_dir):
    import comfy.sd
    from distilled_unets.nodes.host.condconv import ComfyCondConv2d
    from distilled_unets.nodes.loaders import DistilledUNetLoader
    from distilled_unets.nodes.students import SaveStudentUNet

    _, _, _, cc, _ = built
    path = SaveStudentUNet.execute(model=cc, filename_prefix="cc", dtype="fp32").args[0]
    loaded, text = DistilledUNetLoader.execute(unet_name=Path(path).name, weight_dtype="default",
                                               prediction="auto").args
    a, b = cc.model.diffusion_model.state_dict(), loaded.model.diffusion_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(loaded.model.diffusion_model.get_submodule("input_blocks.1.0.in_layers.2"), ComfyCondConv2d)
    assert "CondConv (A-SDM): 6 convolutions with 2 experts" in text
    assert torch.equal(_forward(cc), _forward(loaded))
    # ComfyUI's own UNet loader on the same file: it misreads the expert stacks or cannot fit them
    with pytest.raises(RuntimeError, match="size mismatch|Could not detect model type"):
        comfy.sd.load_diffusion_model(path)


def test_lora_reports_condconv_layers_as_not_mappable(built):
    from distilled_unets.models.structure import names
    from distilled_unets.nodes import lora as node
    from distilled_unets.nodes.host.unet import topology_of

    from .._lora_fixtures import lora_for

    _, teacher, _, cc, _ = built
    tsd = teacher.model.diffusion_model.state_dict()
    mods = {ld: tuple(tsd[f"{ld}.weight"].shape) for ld in names.module_map(topology_of(teacher)).values()
            if ld.endswith(("in_layers.2", "out_layers.3", "attn1.to_q"))}
    tensors, meta, _, _ = lora_for(mods, "kohya-ldm", seed=4)
    before = {k: v.clone() for k, v in cc.model.diffusion_model.state_dict().items()}
    new, _, report = node.apply_lora(cc, None, tensors, meta, 1.0, 0.0)
    assert "not LoRA-mappable, CondConv layers (several experts, no single kernel): 6" in report
    new.patch_model()
    try:
        after = new.model.diffusion_model.state_dict()
        for path in ("input_blocks.1.0.in_layers.2", "output_blocks.7.0.out_layers.3"):
            for name in ("weight", "routing_weight"):
                assert torch.equal(after[f"{path}.{name}"], before[f"{path}.{name}"])
        key = "input_blocks.3.0.in_layers.2.weight"  # level 1: a plain conv, patched
        assert not torch.equal(after[key], before[key])
    finally:
        new.unpatch_model()


def test_distillation_with_condconv_lowers_heldout_error_at_least_as_well(built):
    """The same tiny setup, seed and steps, with and without CondConv: both learn, CondConv at least as well."""
    from distilled_unets.nodes import distill as N

    tm, teacher, plain, cc, _ = built
    g = torch.Generator().manual_seed(7)
    latents = {"samples": torch.randn(12, 4, 8, 8, generator=g)}
    held = {"samples": torch.randn(4, 4, 8, 8, generator=g)}
    cond = [[torch.randn(1, 8, 768, generator=g), {}] for _ in range(12)]
    held_cond = [[torch.randn(1, 8, 768, generator=g), {}] for _ in range(4)]
    kw = dict(steps=30, batch_size=2, gradient_accumulation=1, learning_rate=1e-3, loss_weights="bk-sdm",
              feature_points="stages", train="all", seed=3, ema_decay=0.0, gradient_checkpointing=False,
              precision="auto", checkpoint_every=0, heldout_latents=held, heldout_conditioning=held_cond)
    curves = {}
    for name, student in (("plain", plain), ("condconv", cc)):
        with torch.inference_mode():
            _, loss_map, report = N.distill(student, teacher, latents, cond, **kw)
        curves[name] = loss_map["heldout"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "condconv_heldout_curves.json").write_text(json.dumps(curves, indent=1))
    print(f"\nheld-out output-KD error, plain: {curves['plain']}\n                   condconv: {curves['condconv']}")
    for c in curves.values():
        assert c[-1] < 0.9 * c[0]
    assert curves["plain"][0] == pytest.approx(curves["condconv"][0], rel=1e-4)  # same function at the start
    assert curves["condconv"][-1] <= curves["plain"][-1] * 1.02
