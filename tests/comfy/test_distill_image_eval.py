"""Evaluation while distilling with images (issue 23 item 4): DistillStudentUNet with the teacher's VAE (and a
CLIP vision model) and tools/distill.py with --vae judge the held-out samples as Evaluate Student does, beside the
engine's own held-out output-KD error; a best metric that needs an input not given is refused before the first
step. Tiny random UNets, a random TAESD-sized VAE and a tiny CLIP vision tower, CPU."""

from __future__ import annotations

import pytest
import torch

from .test_distill import run_node
from .test_distill_runs import args_for, files  # noqa: F401  (files: the trainer's tiny teacher, student, dataset)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    import comfy.clip_vision
    import comfy.sd
    import demo_weights
    from distilled_unets.nodes import distill as N
    from distilled_unets.nodes import students

    from . import _tiny_models as tm

    torch.set_num_threads(1)
    with torch.inference_mode():  # models made as the executor makes them
        teacher = tm.build("sd15", tm.SD15_TOPOLOGY, model_channels=32, seed=11)
        student, _ = students.build_student(teacher, "bk-small")
        g = torch.Generator().manual_seed(5)
        latents = {"samples": torch.randn(6, 4, 8, 8, generator=g)}
        pos, _ = tm.conditioning("sd15", tokens=8)
    vae = comfy.sd.VAE(sd=demo_weights.taesd("", seed=4))
    cv = tm.clip_vision(tmp_path_factory.mktemp("cv"), seed=3)
    return N, teacher, student, latents, pos, vae, cv


def test_node_judges_the_heldout_images_and_keeps_the_best_by_psnr(kit):
    N, teacher, student, latents, pos, vae, cv = kit
    kw = dict(steps=2, ema_decay=0.0, eval_every=1)
    model, loss_map, report = run_node(N, student, teacher, latents, pos, best_metric="psnr", vae=vae,
                                       clip_vision=cv, **kw)
    assert loss_map["eval_steps"] == [0, 1, 2]
    for k in ("heldout_kd", "psnr", "ssim", "clip_image_cosine"):
        values = loss_map[f"eval_{k}"]
        assert len(values) == 3 and all(v == v for v in values), k
    assert "ms_ssim" not in "".join(loss_map)  # 64 px held-out images: too small for MS-SSIM
    assert loss_map["eval_heldout_kd"] == loss_map["heldout"]  # the engine's own error, beside the image metrics
    value, step = max(zip(loss_map["eval_psnr"], loss_map["eval_steps"]))
    assert f"holds the best evaluation's weights (psnr {value:.5g} at step {step})" in report
    assert "evaluations: step 0: heldout_kd" in report and "psnr" in report
    # the same training as without the images: the evaluation changes nothing of the run
    _, plain, _ = run_node(N, student, teacher, latents, pos, **kw)
    assert plain["loss"] == loss_map["loss"] and plain["eval_heldout_kd"] == loss_map["eval_heldout_kd"]


@pytest.mark.parametrize("best, given, refused", [("psnr", {}, "vae"), ("cmmd", {"vae": True}, "clip_vision"),
                                                  ("none", {"clip_vision": True}, "vae")])
def test_node_refuses_a_best_metric_it_cannot_measure_before_the_first_step(kit, monkeypatch, best, given, refused):
    import comfy.utils
    from distilled_unets.models.students.distill import DistillError

    N, teacher, student, latents, pos, vae, cv = kit
    bars = []
    monkeypatch.setattr(comfy.utils, "ProgressBar", lambda *a, **k: bars.append(a))
    inputs = {"vae": vae if given.get("vae") else None, "clip_vision": cv if given.get("clip_vision") else None}
    with pytest.raises(DistillError) as e:
        run_node(N, student, teacher, latents, pos, steps=2, best_metric=best, **inputs)
    assert str(e.value).startswith(f"[DistillStudentUNet, input '{refused}']") and not bars


def test_the_trainers_vae_flags(tmp_path):
    """tools/distill.py: --clip-vision without --vae and a --vae that is not a VAE are refused (exit 2) before
    anything trains, naming the flag and the file."""
    import distill as trainer
    from distilled_unets.models.students.distill import DistillError
    from distilled_unets.models.students.evaluate import EvaluationError
    from distilled_unets.nodes.host import judging as J
    from safetensors.torch import save_file

    not_a_vae = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(not_a_vae))

    with pytest.raises(EvaluationError) as e:
        J.load_vae(str(not_a_vae))
    assert "holds no VAE decoder" in str(e.value) and str(not_a_vae) in str(e.value) and "--vae" in str(e.value)
    args = trainer.parse_args(["--teacher", "t.safetensors", "--preset", "bk-small", "--data", str(tmp_path),
                               "--out", str(tmp_path / "out"), "--steps", "1", "--clip-vision", "cv.safetensors"])
    with pytest.raises(DistillError) as e:
        trainer.make_evaluator(args, 0, None, None, None)
    assert "--clip-vision is given without --vae" in str(e.value)


def test_the_trainer_judges_the_heldout_images_with_vae(files, tmp_path):  # noqa: F811  (the fixture)
    """tools/distill.py --vae (a TAESD file) --best-metric psnr: eval.csv holds heldout_kd and the image metrics,
    student-best.safetensors the best evaluation's weights."""
    import csv
    import os

    import demo_weights
    import distill as trainer
    from safetensors.torch import save_file

    vae = tmp_path / "taesd.safetensors"
    save_file(demo_weights.taesd("", seed=4), str(vae))
    out = tmp_path / "out"
    args = args_for(files, out, "--vae", str(vae), "--best-metric", "psnr", "--eval-every", "1",
                    "--heldout-fraction", "0.25", steps=2)
    assert trainer.main(args, own_logging=False) == 0
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert {"heldout_kd", "psnr", "ssim"} <= set(rows[0]) and all(float(r["psnr"]) == float(r["psnr"]) for r in rows)
    assert "student-best.safetensors" in os.listdir(out)
