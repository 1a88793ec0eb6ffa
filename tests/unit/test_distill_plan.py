"""Unit tests for models/students/distill/ (vgg.py included) without ComfyUI: BK-SDM's feature pairing on the
real topologies, the SDPA attention override, batching of conditionings, the VGG term."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from distilled_unets.models.errors import WeightFileError
from distilled_unets.models.structure.names import ldm_module_map
from distilled_unets.models.structure.registry import REGISTRY, TEACHERS, by_id
from distilled_unets.models.structure.topology import diffusers_config
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import vgg as V

# kd_train_text_to_image.py (Nota-NetsPresso/BK-SDM): the hooked modules of teacher and student
BK_BASE_SMALL = (["up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3",
                  "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"],) * 2
BK_TINY = (["down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.1.proj_out",
            "up_blocks.1", "up_blocks.2", "up_blocks.3"],
           ["down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.0.proj_out",
            "up_blocks.0", "up_blocks.1", "up_blocks.2"])


def diffusers_module(ldm_path: str, topo) -> str:
    """The diffusers module (resnet / attention / sampler, or a named leaf) at an ldm module path."""
    inverse = ldm_module_map(topo)
    if ldm_path in inverse:
        return inverse[ldm_path]
    hits = [d for ld, d in inverse.items() if ld.startswith(ldm_path + ".")]
    assert hits, f"no module under {ldm_path}"
    heads = {re.match(r"^((?:down_blocks|up_blocks)\.\d+\.\w+\.\d+|mid_block\.\w+\.\d+)", h).group(1) for h in hits}
    assert len(heads) == 1, (ldm_path, heads)
    return heads.pop()


def block_output_module(block: str, cfg: dict) -> str:
    """The last module a diffusers down/up block runs: what a hook on the block itself returns (output[0])."""
    kind, i = block.split(".")
    i = int(i)
    types = cfg["down_block_types" if kind == "down_blocks" else "up_block_types"]
    n = len(types)
    layers = cfg["layers_per_block"] + (0 if kind == "down_blocks" else 1)
    if kind == "down_blocks" and i < n - 1:
        return f"down_blocks.{i}.downsamplers.0"
    if kind == "up_blocks" and i < n - 1:
        return f"up_blocks.{i}.upsamplers.0"
    last = "attentions" if types[i].startswith("CrossAttn") else "resnets"
    return f"{block}.{last}.{layers - 1}"


def bk_reference(hooks: list[str], cfg: dict) -> list[str]:
    return [h if h.endswith("proj_out") else block_output_module(h, cfg) for h in hooks]


SD15_DIFFUSERS = dict(layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


@pytest.mark.parametrize("student_id,bk", [("nota-ai/bk-sdm-base", BK_BASE_SMALL),
                                           ("nota-ai/bk-sdm-small", BK_BASE_SMALL),
                                           ("nota-ai/bk-sdm-tiny", BK_TINY),
                                           ("nota-ai/bk-sdm-v2-small", BK_BASE_SMALL),
                                           ("nota-ai/bk-sdm-v2-tiny", BK_TINY)])
def test_feature_points_are_bk_sdms(student_id, bk):
    student = by_id(student_id)
    teacher = TEACHERS[student.family]
    plan = D.feature_plan(teacher.structure, student.structure)
    s_cfg = diffusers_config(student.structure)
    got_t = sorted(diffusers_module(p.teacher, teacher.structure) for p in plan.points)
    got_s = sorted(diffusers_module(p.student, student.structure) for p in plan.points)
    assert got_t == sorted(bk_reference(bk[0], SD15_DIFFUSERS))
    assert got_s == sorted(bk_reference(bk[1], s_cfg))
    # pairs line up by position too (teacher i <-> student i in BK-SDM's lists)
    pairs = {(diffusers_module(p.teacher, teacher.structure), diffusers_module(p.student, student.structure))
             for p in plan.points}
    assert pairs == set(zip(bk_reference(bk[0], SD15_DIFFUSERS), bk_reference(bk[1], s_cfg)))


def test_mid_block_term_only_where_both_have_one():
    sd15 = TEACHERS["sd1"].structure
    base = D.feature_plan(sd15, by_id("nota-ai/bk-sdm-base").structure, mid=True)
    mid = [p for p in base.points if p.kind == "mid"]
    assert [(p.teacher, p.student) for p in mid] == [("middle_block.2", "middle_block.2")]
    small = D.feature_plan(sd15, by_id("nota-ai/bk-sdm-small").structure, mid=True)
    assert not [p for p in small.points if p.kind == "mid"]
    assert any("student has no mid block" in s for s in small.skipped)
    assert any("mid_block" in line for line in base.report_lines())


@pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.is_teacher], ids=lambda e: e.id)
def test_every_public_student_pairs_with_its_teacher(entry):
    teacher = TEACHERS[entry.family].structure
    plan = D.feature_plan(teacher, entry.structure, mid=True)
    assert plan.points, plan.skipped
    for p in plan.points:  # every hooked path is a module of its UNet
        diffusers_module(p.teacher, teacher)
        diffusers_module(p.student, entry.structure)


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_sdpa_override_equals_plain_attention(skip_reshape):
    g = torch.Generator().manual_seed(0)
    b, heads, d = 2, 4, 8
    q = torch.randn(b, 12, heads * d, generator=g)
    k = torch.randn(b, 5, heads * d, generator=g)
    v = torch.randn(b, 5, heads * d, generator=g)

    def ref(q, k, v):
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        w = (qh @ kh.transpose(-1, -2) / d ** 0.5).softmax(-1)
        return (w @ vh).transpose(1, 2).reshape(b, -1, heads * d)

    def never(*a, **kw):
        raise AssertionError("unmasked calls must not fall back")

    if skip_reshape:
        args = [t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v)]
        out = D.sdpa_attention(never, *args, heads, skip_reshape=True, transformer_options={})
    else:
        out = D.sdpa_attention(never, q, k, v, heads, transformer_options={})
    torch.testing.assert_close(out, ref(q, k, v), rtol=1e-5, atol=1e-5)
    called = []
    D.sdpa_attention(lambda *a, **kw: called.append(kw["mask"]), q, k, v, heads, mask=torch.zeros(12, 5))
    assert len(called) == 1


def test_conditionings_of_different_lengths_batch_without_changing_attention():
    g = torch.Generator().manual_seed(1)
    c77, c154 = torch.randn(77, 16, generator=g), torch.randn(154, 16, generator=g)
    data = D.KDData(torch.randn(2, 4, 8, 8, generator=g), [c77, c154])
    x0, ctx, y = data.batch(torch.tensor([0, 1]))
    assert ctx.shape == (2, 154, 16) and y is None
    q = torch.randn(1, 3, 16, generator=g)
    short = F.scaled_dot_product_attention(q, c77[None], c77[None])
    repeated = F.scaled_dot_product_attention(q, ctx[:1], ctx[:1])
    torch.testing.assert_close(repeated, short, rtol=1e-5, atol=1e-6)
    with pytest.raises(D.DistillError, match="3 conditionings for 2 latents"):
        D.KDData(torch.zeros(2, 4, 8, 8), [c77, c77, c77])


def test_per_step_randomness_depends_only_on_seed_and_step():
    a = torch.randn(3, generator=D.step_generator(7, "step", 5, 0))
    b = torch.randn(3, generator=D.step_generator(7, "step", 5, 0))
    c = torch.randn(3, generator=D.step_generator(7, "step", 6, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_errors_name_the_input():
    with pytest.raises(D.DistillError) as e:
        D.DistillConfig(steps=10, grad_accum=0).validate()
    assert e.value.input_name == "gradient_accumulation" and "Fix:" in str(e.value)
    with pytest.raises(D.DistillError, match="checkpoint folder"):
        D.DistillConfig(steps=10, checkpoint_every=5).validate()


# ---- VGG term -----------------------------------------------------------------------------------

def torchvision_vgg16_state(seed=0, full=True):
    """Random weights under torchvision's VGG16 key names (features.N.weight/bias, classifier ...)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    i, cin = 0, 3
    for c in cfg:
        if c == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.01
        cin = c
        i += 2
    if full:
        sd["classifier.0.weight"] = torch.zeros(8, 8)
    return sd


def test_vgg_features_equal_torchvision():
    tv = pytest.importorskip("torchvision")
    sd = torchvision_vgg16_state()
    ref = tv.models.vgg16()
    ref.load_state_dict({**ref.state_dict(), **{k: v for k, v in sd.items() if k.startswith("features")}})
    ref.eval()
    ours = V.load_vgg16({f"vgg.{k}": v for k, v in sd.items()})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = ours(x)
    with torch.no_grad():
        want = [ref.features[:4](x), ref.features[:9](x), ref.features[:16](x)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())


def test_vgg_file_errors():
    sd = torchvision_vgg16_state(full=False)
    with pytest.raises(WeightFileError, match="not a torchvision VGG16"):
        V.load_vgg16({"encoder.weight": torch.zeros(1)}, path="x.safetensors")
    bad = dict(sd)
    bad["features.12.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(WeightFileError, match="features.12.weight"):
        V.load_vgg16(bad)
    bad = dict(sd)
    del bad["features.14.bias"]
    with pytest.raises(WeightFileError, match="lacks 'features.14.bias'"):
        V.load_vgg16(bad)


def test_semantic_vgg_loss_is_zero_for_equal_outputs_and_has_gradients():
    vgg = V.load_vgg16(torchvision_vgg16_state())
    loss = V.SemanticVGGLoss(vgg, [[0.35, 0.23, 0.32], [0.33, 0.50, 0.24], [-0.28, 0.18, 0.27],
                                   [-0.21, -0.26, -0.72]])
    g = torch.Generator().manual_seed(0)
    x0_t = torch.randn(2, 4, 16, 16, generator=g)
    feats = loss.teacher_features(x0_t)
    w = torch.tensor([1.0, 0.5])
    assert float(loss(x0_t, feats, w)) == 0.0
    x0_s = (x0_t + 0.3 * torch.randn(2, 4, 16, 16, generator=g)).requires_grad_(True)
    value = loss(x0_s, feats, w)
    value.backward()
    assert float(value.detach()) > 0 and x0_s.grad is not None and float(x0_s.grad.abs().sum()) > 0
