"""Evaluate Student in a real ComfyUI (CPU): tiny random UNets built through ComfyUI's classes, a random TAESD as the
VAE, a tiny random CLIP vision model (ComfyUI's ClipVisionModel from a small config) and a stand-in text encoder
(random conditioning per prompt; ComfyUI's own text encoders are full size). Checks: the same noise for teacher and
students (a student that is the teacher gives identical images), the files and metrics.json, metrics recomputed
from the saved PNGs, the inputs left unchanged, numbered folders, bad input before any image, resume after a stop.
"""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

from . import _tiny_models as tm

SIZE = 64
PROMPTS = "a red cube\na blue sphere"


class FakeClip:
    """CLIP Text Encode's contract (tokenize, encode_from_tokens[_scheduled]) with a random [1, 8, width]
    conditioning per text, seeded by the text; ``tower`` names a projected text tower (SDXL clip_g, SD2 clip_h)."""

    def __init__(self, width=768, tower=None, proj_dim=32):
        self.width, self.proj_dim = width, proj_dim
        self.cond_stage_model = SimpleNamespace(**({tower: object()} if tower else {}))

    def tokenize(self, text):
        return text

    def _g(self, text):
        return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))

    def encode_from_tokens(self, tokens, return_pooled=False):
        g = self._g(tokens)
        cond = torch.randn(1, 8, self.width, generator=g)
        pooled = torch.randn(1, self.proj_dim, generator=g)
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens):
        return [[self.encode_from_tokens(tokens), {}]]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import comfy.clip_vision
    import comfy.sd
    import demo_weights

    torch.set_num_threads(1)
    cv = tm.clip_vision(tmp_path_factory.mktemp("cv"), seed=3)
    return SimpleNamespace(teacher=tm.build("sd15", seed=1), student=tm.build("sd15", seed=2), clip=FakeClip(),
                           vae=comfy.sd.VAE(sd=demo_weights.taesd("", seed=4)), clip_vision=cv)


def weights(patcher):
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def run_node(env, **kw):
    from distilled_unets.nodes.evaluate import evaluate

    args = dict(teacher=env.teacher, student=env.student, clip=env.clip, vae=env.vae, prompts=PROMPTS, negative="",
                seed=5, images_per_prompt=2, steps=2, cfg=3.0, sampler="euler", scheduler="normal", width=SIZE,
                height=SIZE)
    args.update(kw)
    return evaluate(**args)


def out_root():
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "distilled_unets", "evaluate")


def test_node_end_to_end(env):
    from distilled_unets.models.students.evaluate import metrics as M
    from distilled_unets.nodes.host import judging as J
    from PIL import Image

    before = weights(env.teacher), weights(env.student)
    grid, images, report = run_node(env, student_2=env.teacher, clip_vision=env.clip_vision, filename_prefix="e2e")
    # the inputs are only read
    for a, b in zip(before, (weights(env.teacher), weights(env.student))):
        assert all(torch.equal(a[k], b[k]) for k in a)
    folder = sorted(f for f in os.listdir(out_root()) if f.startswith("e2e_"))[-1]
    folder = os.path.join(out_root(), folder)
    assert sorted(os.listdir(folder)) == ["grid.png", "metrics.json", "student", "student_2", "teacher"]
    names = [f"{i:06d}.png" for i in range(4)]
    for sub in ("teacher", "student", "student_2"):
        assert sorted(f for f in os.listdir(os.path.join(folder, sub)) if f.endswith(".png")) == names
    assert grid.shape == (1, 4 * SIZE, 5 * SIZE, 3) and images.shape == (12, SIZE, SIZE, 3)
    # the same noise per (prompt, seed): a "student" that is the teacher gives the teacher's images, bit for bit
    t = J.read_pngs(os.path.join(folder, "teacher"), [SimpleNamespace(file_name=n) for n in names])
    s2 = J.read_pngs(os.path.join(folder, "student_2"), [SimpleNamespace(file_name=n) for n in names])
    s1 = J.read_pngs(os.path.join(folder, "student"), [SimpleNamespace(file_name=n) for n in names])
    assert torch.equal(t, s2) and not torch.equal(t, s1)
    # image k of prompt p uses seed 5 + k (PNG text), and the prompts' images differ
    with Image.open(os.path.join(folder, "teacher", "000003.png")) as im:
        assert im.text["seed"] == "6" and im.text["prompt"] == "a blue sphere"
    assert torch.equal(images[:4], t.float() / 255)
    metrics = json.loads(open(os.path.join(folder, "metrics.json")).read())
    m1, m2 = metrics["students"]["student"]["metrics"], metrics["students"]["student_2"]["metrics"]
    assert m2["psnr"] == "inf" and m2["ssim"] == pytest.approx(1.0) and m2["cmmd"] == pytest.approx(0, abs=1e-9)
    # every figure recomputed from the saved files
    assert m1["psnr"] == pytest.approx(float(M.pair_scores(t, s1)["psnr"].mean()), rel=1e-9)
    tc, sc = J.image_embeddings(env.clip_vision, t), J.image_embeddings(env.clip_vision, s1)
    assert m1["cmmd"] == pytest.approx(M.cmmd(tc, sc), rel=1e-6)
    assert m1["fd_clip"] == pytest.approx(M.frechet_distance(tc, sc), rel=1e-6)
    assert metrics["students"]["student"]["images"]["psnr"] == 4
    for k in ("psnr", "ssim", "clip_image_cosine", "fd_clip", "kid_clip", "cmmd", "95% CI", "what it says"):
        assert k in report, k
    assert "clip_score left out" in report and "no text projection" in report
    assert "fid, kid and inception_score left out" in report


def test_two_runs_two_numbered_folders(env):
    run_node(env, prompts="one prompt", images_per_prompt=1, filename_prefix="twice")
    run_node(env, prompts="one prompt", images_per_prompt=1, filename_prefix="twice")
    assert sorted(f for f in os.listdir(out_root()) if f.startswith("twice_")) == ["twice_00001", "twice_00002"]


@pytest.mark.parametrize("case", ["family", "empty", "size", "vision", "stats-without-net", "sampler"])
def test_bad_input_before_any_image(env, case, monkeypatch):
    from distilled_unets.models.errors import PackError

    kw = {"family": dict(student=tm.build("sdxl", seed=3)), "empty": dict(prompts="\n  \n"),
          "size": dict(width=100), "vision": dict(clip_vision="not a model"),
          "stats-without-net": dict(reference_stats="stats.npz"), "sampler": dict(sampler="nope")}[case]
    expect = {"family": "student", "empty": "prompts", "size": "width", "vision": "clip_vision",
              "stats-without-net": "reference_stats", "sampler": "sampler"}[case]
    listed = set(os.listdir(out_root())) if os.path.isdir(out_root()) else set()
    if case == "stats-without-net":
        import folder_paths

        orig = folder_paths.get_full_path
        monkeypatch.setattr(folder_paths, "get_full_path",
                            lambda folder, name: "/x/stats.npz" if name == "stats.npz" else orig(folder, name))
    with pytest.raises(PackError) as e:
        run_node(env, **kw)
    msg = str(e.value)
    assert "EvaluateStudent" in msg and "Fix:" in msg
    assert e.value.input_name in (expect, "inception"), msg
    after = set(os.listdir(out_root())) if os.path.isdir(out_root()) else set()
    assert after == listed  # no folder, no image


def test_stop_then_resume_skips_written_images(env, tmp_path):
    from distilled_unets.models.students.evaluate import parse_prompts
    from distilled_unets.nodes.host import judging as J

    s = J.Settings(steps=2, cfg=3.0, sampler="euler", scheduler="normal", width=SIZE, height=SIZE, negative="",
                   seed=0, images_per_prompt=2, batch_size=1)
    calls = []

    def stop_after_3():
        calls.append(1)
        if len(calls) > 3:
            raise InterruptedError

    ids = {"teacher": {"t": 1}, "student": {"s": 1}}
    args = (env.teacher, {"student": env.student}, env.clip, env.vae, parse_prompts(PROMPTS), s, str(tmp_path))
    with pytest.raises(InterruptedError):
        J.run_evaluation(*args, model_ids=ids, cancel=stop_after_3)
    assert len(os.listdir(tmp_path / "teacher")) == 4 and len(os.listdir(tmp_path / "student")) == 1  # + manifests
    stamp = {f: os.stat(tmp_path / "teacher" / f).st_mtime_ns for f in os.listdir(tmp_path / "teacher")}
    made = []
    out = J.run_evaluation(*args, model_ids=ids, progress=made.append)
    assert sum(made) == 8 and out.results["student"].counts["psnr"] == 4
    assert {f: os.stat(tmp_path / "teacher" / f).st_mtime_ns for f in stamp} == stamp  # not made again
    # the same folder with other settings is refused, nothing overwritten
    from distilled_unets.models.errors import PackError

    with pytest.raises(PackError, match="another settings"):
        J.run_evaluation(*args[:5], J.Settings(**dict(s.__dict__, steps=3)), str(tmp_path), model_ids=ids)


def test_clip_score_only_for_matching_projected_towers():
    from distilled_unets.nodes.host import judging as J

    def vision(width):
        return SimpleNamespace(encode_image=None, model=SimpleNamespace(
            visual_projection=SimpleNamespace(weight=torch.zeros(8, width))))

    emb, note = J.clip_score_text(FakeClip(tower="clip_h", proj_dim=8), vision(1280), ["a", "b"])
    assert note is None and emb.shape == (2, 8)
    emb, note = J.clip_score_text(FakeClip(tower="clip_g"), vision(1280), ["a"])
    assert emb is None and "ViT-bigG/14" in note
    emb, note = J.clip_score_text(FakeClip(), vision(1024), ["a"])
    assert emb is None and "no text projection" in note


def test_settings_left_to_the_student(env):
    """steps / cfg / width / height 0 and sampler / scheduler "recommended" take the first student's recommended
    settings (the loader's attachment), else the defaults; given values are kept; the report and metrics.json say
    where they came from."""
    from distilled_unets.nodes.host import judging as J
    from distilled_unets.nodes.host.unet import RECOMMENDED_KEY

    rec = {"model": "segmind/tiny-sd", "sampler": "dpmpp_2m", "scheduler": "karras", "steps": 2, "cfg": 3.5,
           "width": 64, "height": 72}
    student = env.student.clone()
    student.set_attachments(RECOMMENDED_KEY, rec)
    auto = dict(steps=0, cfg=0.0, sampler=J.RECOMMENDED, scheduler=J.RECOMMENDED, width=0, height=0)
    _, _, report = run_node(env, student=student, prompts="one prompt", images_per_prompt=1,
                            filename_prefix="recommended", **auto)
    folder = sorted(f for f in os.listdir(out_root()) if f.startswith("recommended_"))[-1]
    metrics = json.loads(open(os.path.join(out_root(), folder, "metrics.json")).read())
    assert {k: metrics["settings"][k] for k in auto} == {k: rec[k] for k in auto}
    assert "the recommended settings of segmind/tiny-sd (student)" in metrics["settings_from"]
    assert "64x72, dpmpp_2m / karras, 2 steps, CFG 3.5" in report and metrics["settings_from"] in report
    assert env.student.get_attachment(RECOMMENDED_KEY) is None  # the clone carried it, not the input
    # given values are kept; the second student's settings count when the first has none
    v, note = J.resolve_settings({"student": env.student, "student_2": student}, "sd1", "EvaluateStudent",
                                 **dict(auto, steps=7, sampler="euler"))
    assert v == dict(steps=7, cfg=3.5, sampler="euler", scheduler="karras", width=64, height=72)
    assert note == "cfg, scheduler, width, height: the recommended settings of segmind/tiny-sd (student_2)"
    # no student carries any: the defaults and the family's size
    v, note = J.resolve_settings({"student": env.student}, "sd1", "EvaluateStudent", **auto)
    assert v == dict(J.FALLBACK, width=512, height=512) and note.startswith("steps, cfg, sampler, scheduler, width, "
                                                                             "height: defaults")


def test_shipped_workflow_matches_the_node():
    from _workflows import check_pack_nodes, load

    wf = load("evaluate_student_sd15.json")
    check_pack_nodes(wf)
    node = next(n for n in wf["nodes"] if n["type"] == "EvaluateStudent")
    assert {i["name"]: i["link"] for i in node["inputs"]}["clip_vision"] is None  # optional: the note says how
