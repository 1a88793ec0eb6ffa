"""The in-training evaluator (models/students/evaluate/heldout.py) on tiny UNets built through ComfyUI's classes:
its Euler sampler equals ComfyUI's own euler on the same sigmas and noise, the same noise for teacher and student
(the teacher judged against itself is identical), the teacher sampled once, the student left unchanged and not kept,
the same figures every call.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from . import _tiny_models as tm


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import comfy.clip_vision
    import comfy.sd
    import demo_weights
    from distilled_unets.models.students import distill as D
    from distilled_unets.models.students.evaluate import HeldoutEvaluator
    from distilled_unets.nodes.host import judging as J

    torch.set_num_threads(1)
    teacher, student = tm.build("sd15", seed=1), tm.build("sd15", seed=2)
    g = torch.Generator().manual_seed(0)
    data = D.KDData(torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 8, 768, generator=g) * 0.5)
    vae = comfy.sd.VAE(sd=demo_weights.taesd("", seed=4))
    cv = tm.clip_vision(tmp_path_factory.mktemp("cv"), seed=3)
    schedule = D.NoiseSchedule(teacher.get_model_object("model_sampling"), prediction="eps")
    ev = HeldoutEvaluator(teacher.model.diffusion_model, schedule, data, J.latent_decoder(vae, teacher),
                          image_features=J.image_feature_fn(cv), steps=4, seed=3, batch_size=2)
    return SimpleNamespace(teacher=teacher, student=student, data=data, vae=vae, ev=ev, schedule=schedule, J=J)


def test_euler_equals_comfyuis_euler(env):
    import comfy.sample

    ev = env.ev
    sigmas, _ = ev._plan("cpu")
    _, ctx, _ = env.data.batch(torch.tensor([0]))
    noise = ev._noise(0, (4, 8, 8))[None]
    ours = ev.images(env.teacher.model.diffusion_model)[0]
    cond = [[ctx, {}]]
    lat = comfy.sample.sample(env.teacher, noise, 4, 1.0, "euler", "normal", cond, cond, torch.zeros(1, 4, 8, 8),
                              sigmas=sigmas.cpu(), disable_pbar=True, seed=0)
    theirs = env.J.decode(env.vae, lat)[0]
    assert (ours.int() - theirs.int()).abs().max() <= 1  # the same sampler, up to float rounding at 8 bit


def test_teacher_against_itself_and_a_student(env):
    ev = env.ev
    calls = []
    hook = env.teacher.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        same = ev(env.teacher.model.diffusion_model, 0)
        n_teacher = len(calls)
        before = {k: v.clone() for k, v in env.student.model.diffusion_model.state_dict().items()}
        a = ev(env.student.model.diffusion_model, 10)
        b = ev(env.student.model.diffusion_model, 20)
    finally:
        hook.remove()
    assert n_teacher == 2 * 4 * 3  # (teacher, then the teacher as the judged model) x 4 steps x 3 batches
    assert len(calls) == n_teacher  # the teacher's images were kept: not sampled again
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    assert same["cmmd"] == pytest.approx(0.0, abs=1e-9) and same["clip_image_cosine"] == pytest.approx(1.0)
    assert a == b  # the same noise and figures every call
    for k in ("psnr", "ssim", "clip_image_cosine", "fd_clip", "kid_clip", "cmmd", "psnr_ci_low", "psnr_ci_high"):
        assert k in a and a[k] == a[k], k
    assert a["psnr"] < 60 and 0 < a["ssim"] < 1
    assert all(torch.equal(before[k], v) for k, v in env.student.model.diffusion_model.state_dict().items())


def test_keeps_no_reference_to_the_student(env):
    student = tm.build("sd15", seed=5).model.diffusion_model
    ref = weakref.ref(student)
    env.ev(student, 1)
    del student
    gc.collect()
    assert ref() is None
