"""tools/evaluate.py: one process and two under torchrun (gloo on the CPU) give the same images and metrics; a
stopped run started again makes only the missing images; the teacher's images are reused for another student;
bad input exits with 2 before any image, naming the flag and the fix.

Models: the demo weights (tools/demo_weights.py: an SD1.5-layout checkpoint with a random CLIP-L and TAESD, and
the tiny-sd-shaped random student), a random FID Inception written as a user's .pth; 64 px, 2 steps. The single
process runs ``evaluate.main`` in this process; the two-process run is a torchrun subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from .._evaluate_tool import TOOL, main
from ._torchrun import free_port, torchrun_env

PROMPTS = "a red cube\na blue sphere\n"




@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_path):
    import demo_weights
    import torchvision
    from run_workflow import DEFAULT_DEMO_DIR

    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same float rounding
    demo = demo_weights.ensure(DEFAULT_DEMO_DIR)
    root = tmp_path_factory.mktemp("evaltool")
    (root / "prompts.txt").write_text(PROMPTS)
    torch.manual_seed(0)
    net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    inc = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), inc)
    return {"teacher": str(demo / "checkpoints" / demo_weights.SD15_CKPT),
            "student": str(demo / "diffusion_models" / demo_weights.STUDENT_FILE),
            "student_folder": str(demo / "diffusion_models" / demo_weights.STUDENT_FOLDER),
            "prompts": str(root / "prompts.txt"), "inception": str(inc), "root": root, "comfyui": str(comfyui_path)}


def args(files, out, *extra, students=None):
    return ["--teacher", files["teacher"], "--student", *(students or [files["student"]]), "--prompts",
            files["prompts"], "--images-per-prompt", "2", "--seed", "7", "--steps", "2", "--cfg", "3", "--width", "64",
            "--height", "64", "--out", str(out), "--comfyui", files["comfyui"], "--no-progress", *extra]




@pytest.fixture(scope="module")
def ref1(files):
    out = files["root"] / "one"
    assert main(args(files, out, "--inception", files["inception"], "--fid-size", "48")) == 0
    return out


@pytest.fixture(scope="module")
def ref2(files):
    out = files["root"] / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", TOOL, *args(files, out)]
    p = subprocess.run(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "== demo-tiny-sd vs teacher ==" in p.stdout
    return out


def pixels(folder):
    from PIL import Image

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".png"):
            with Image.open(os.path.join(folder, f)) as im:
                out[f] = np.array(im)
    return out


def test_two_processes_give_the_one_process_images_and_metrics(ref1, ref2):
    for sub in ("teacher", "demo-tiny-sd"):
        a, b = pixels(ref1 / sub), pixels(ref2 / sub)
        assert sorted(a) == [f"{i:06d}.png" for i in range(4)]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), sub
    m1, m2 = (json.loads((r / "metrics.json").read_text())["students"]["demo-tiny-sd"] for r in (ref1, ref2))
    for k in ("psnr", "ssim"):  # the one-process run also had the Inception: its figures are there only
        assert m1["metrics"][k] == m2["metrics"][k] and m1["ci95"][k] == m2["ci95"][k]
    for k in ("fid", "kid", "inception_score", "inception_score_teacher"):
        assert k in m1["metrics"] and k not in m2["metrics"], k
    assert m1["images"]["psnr"] == 4 and (ref1 / "grid.png").is_file()


def test_restart_makes_only_missing_images_and_reuses_the_teacher(files, ref1, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ref1, out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "teacher").glob("*.png")}
    gone = out / "demo-tiny-sd" / "000002.png"
    want = pixels(out / "demo-tiny-sd")
    gone.unlink()
    (out / "demo-tiny-sd" / ".000003.png.123.writing").write_bytes(b"half")  # what a killed process leaves
    assert main(args(files, out, students=[files["student"], files["student_folder"]])) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the teacher's images were reused
    again = pixels(out / "demo-tiny-sd")
    assert again.keys() == want.keys() and all(np.array_equal(want[k], again[k]) for k in want)
    assert not [f for f in os.listdir(out / "demo-tiny-sd") if f.endswith(".writing")]
    assert len(pixels(out / "unet")) == 4  # the second student (the diffusers folder of the same weights)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["students"]) == {"demo-tiny-sd", "unet"}
    assert metrics["students"]["unet"]["metrics"]["psnr"] == metrics["students"]["demo-tiny-sd"]["metrics"]["psnr"]


@pytest.mark.parametrize("case", ["empty-prompts", "clip-vision-not-one", "stats-dimension", "other-family",
                                  "size", "out-of-other-settings"])
def test_bad_input_exits_2_before_any_image(files, ref1, tmp_path, caplog, case):
    out = tmp_path / "out"
    extra, students = [], None
    if case == "empty-prompts":
        p = tmp_path / "empty.txt"
        p.write_text("\n \n")
        extra = ["--prompts", str(p)]
    elif case == "clip-vision-not-one":
        extra = ["--clip-vision", files["student"]]
    elif case == "stats-dimension":
        p = tmp_path / "stats.npz"
        np.savez(p, mu=np.zeros(64), sigma=np.eye(64))
        extra = ["--inception", files["inception"], "--reference-stats", str(p)]
    elif case == "other-family":
        from distilled_unets.nodes.students import write_unet

        from . import _tiny_models as tm

        students = [write_unet(tm.build("sdxl", seed=3), str(tmp_path), lambda n: "xl.safetensors", "fp32", "xl")]
    elif case == "size":
        extra = ["--width", "100"]
    elif case == "out-of-other-settings":
        out = ref1
        extra = ["--steps", "3"]
    flag, file = {"empty-prompts": ("--prompts", "empty.txt"), "clip-vision-not-one": ("--clip-vision", "demo-tiny-sd"),
                  "stats-dimension": ("--reference-stats", "stats.npz"), "other-family": ("--student", "xl"),
                  "size": ("--width", None), "out-of-other-settings": ("--out", "one")}[case]
    before = sorted(os.listdir(out)) if out.exists() else None
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert main(args(files, out, *extra, students=students)) == 2
    msg = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "tools/evaluate.py" in msg and flag in msg and "Fix:" in msg, msg
    if file:
        assert file in msg, msg
    if before is None:
        assert not out.exists() or not any(out.rglob("*.png"))
    else:
        assert sorted(os.listdir(out)) == before
