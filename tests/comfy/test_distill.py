# ruff: noqa: T201  (the runs print their loss and held-out curves; see them with -s)
"""Distillation engine (models/students/distill/) on ComfyUI's own UNet: tiny random teachers and students built
through ComfyUI's classes, seeded CPU runs.

Stated margins (the runs are seeded, the numbers are printed with ``-s``):
* a student initialised from the teacher by dropping blocks: after 24 steps the held-out output-KD error
  is at most 0.8x its value before, and the mean loss of the last 4 steps is below that of the first 4;
* retargeting: that student, trained 24 steps toward teacher B (teacher A with every weight perturbed by
  30 % of its spread, a stand-in for a fine-tune), ends at most 0.9x its held-out error toward B before.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.topology import Topology
from distilled_unets.models.students.eval_hook import EvalSchedule

# teacher: two res blocks per level and a mid block; student: BK-SDM-Base-like (one res block per level,
# up levels keep blocks 0 and 2 of three, mid block kept). Widths are set by _tiny_models.build.
TEACHER = Topology("sd1", 320, (1, 2), (2, 2), (1, 1, 1, 1), (1, 1, 1, 1, 1, 1), 1, 768, False)
STUDENT = Topology("sd1", 320, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), 1, 768, False)
# BK-SDM-Tiny's situation at two levels: the student drops the deepest level, its last level loses the
# downsampler, so the tiny rule (last attention's proj_out) pairs that level
TEACHER3 = Topology("sd1", 320, (1, 2, 2), (2, 2, 2), (1, 1, 1, 1, 0, 0), (1, 1, 1, 1, 1, 1, 0, 0, 0), -1, 768, False)
TINY = Topology("sd1", 320, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), -2, 768, False)
LR = 1e-3


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    from distilled_unets.models.structure.topology import from_comfy_config
    from distilled_unets.models.students import distill as D

    from . import _tiny_models as tm

    return tm, D, from_comfy_config


def topo(env, patcher):
    _, _, from_cfg = env
    return from_cfg(patcher.model.model_config.unet_config, "sd1")


def drop_blocks(D, teacher_unet, tt, student_unet, st):
    """Initialise the student from the teacher as BK-SDM does: down levels keep res block 0, up levels
    keep blocks 0 and the last (student block 1 <- teacher block 2), samplers, mid, ends copied by name."""
    T, S = D.unet_layout(tt), D.unet_layout(st)
    prefix = {}
    for level in range(st.levels):
        for i, k in enumerate(S.res[level]):
            prefix[f"input_blocks.{k}."] = f"input_blocks.{T.res[level][i]}."
        if S.down[level] is not None:
            prefix[f"input_blocks.{S.down[level]}."] = f"input_blocks.{T.down[level]}."
        t_out, s_out = T.out[level], S.out[level]
        for i, k in enumerate(s_out):
            prefix[f"output_blocks.{k}."] = f"output_blocks.{t_out[0 if i == 0 else len(t_out) - len(s_out) + i]}."
    tsd = teacher_unet.state_dict()
    new = {}
    for key, v in student_unet.state_dict().items():
        src = key
        for a, b in prefix.items():
            if key.startswith(a):
                src = b + key[len(a):]
                break
        assert tsd[src].shape == v.shape, (key, src)
        new[key] = tsd[src].clone()
    student_unet.load_state_dict(new)


def make_data(D, n_train=10, n_held=2, size=8, tokens=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n_train + n_held, 4, size, size, generator=g)
    ctx = torch.randn(n_train + n_held, tokens, 768, generator=g) * 0.5
    return D.KDData(lat[:n_train], ctx[:n_train]), D.KDData(lat[n_train:], ctx[n_train:])


def distiller(env, teacher, student, data, held, *, steps, **cfg):
    _, D, _ = env
    cfg.setdefault("learning_rate", LR)
    cfg.setdefault("batch_size", 2)
    cfg.setdefault("ema_decay", 0.0)
    trainable = cfg.pop("trainable", None)
    semantic = cfg.pop("semantic", None)
    hooks = {k: cfg.pop(k) for k in ("evaluator", "on_eval", "save_best") if k in cfg}
    schedule = EvalSchedule(cfg.pop("eval_every", 0), cfg.pop("best_metric", ""))
    return D.Distiller(teacher=teacher.model.diffusion_model, student=student.model.diffusion_model,
                       teacher_topology=topo(env, teacher), student_topology=topo(env, student),
                       schedule=D.NoiseSchedule(teacher.model.model_sampling, prediction="eps"), data=data,
                       heldout=held, config=D.DistillConfig(steps=steps, **cfg), trainable=trainable, semantic=semantic,
                       device="cpu", eval_schedule=schedule, **hooks)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fmt(xs):
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


@pytest.fixture(scope="module")
def models(env):
    tm, D, _ = env
    teacher = tm.build("sd15", TEACHER, model_channels=32, seed=1)
    student = tm.build("sd15", STUDENT, model_channels=32, seed=2)
    drop_blocks(D, teacher.model.diffusion_model, topo(env, teacher), student.model.diffusion_model,
                topo(env, student))
    data, held = make_data(D)
    return teacher, student, data, held


@pytest.fixture(scope="module")
def distilled(env, models):
    teacher, student, data, held = models
    before = (snapshot(teacher.model.diffusion_model), snapshot(student.model.diffusion_model))
    d = distiller(env, teacher, student, data, held, steps=24, features="stages+mid", eval_every=8)
    res = d.run()
    return res, before


def test_built_student_learns_the_teacher(env, models, distilled):
    res, (t_before, s_before) = distilled
    teacher, student, *_ = models
    print(f"\nbuilt student: loss {fmt(res.losses)}\n  held-out output-KD error {res.heldout_curve}")
    assert len(res.losses) == 24 and all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert res.heldout_after <= 0.8 * res.heldout_before
    assert set(res.parts) == {"task", "out", "feat", "mid"}
    assert any("mid_block" in line for line in res.report)
    # the inputs are untouched and a trained copy came back
    assert same(snapshot(teacher.model.diffusion_model), t_before)
    assert same(snapshot(student.model.diffusion_model), s_before)
    assert not same(res.state_dict, s_before)
    assert not any(m._forward_hooks for m in teacher.model.diffusion_model.modules())


def test_retargeting_toward_another_teacher(env, models, distilled):
    tm, D, _ = env
    teacher_a, student, data, held = models
    res_a, _ = distilled
    teacher_b = tm.build("sd15", TEACHER, model_channels=32, seed=1)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # B = A with every weight perturbed by 30 % of its spread (a "fine-tune")
        for p in teacher_b.model.diffusion_model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    distilled_a = tm.build("sd15", STUDENT, model_channels=32, seed=2)
    distilled_a.model.diffusion_model.load_state_dict(res_a.state_dict)
    d = distiller(env, teacher_b, distilled_a, data, held, steps=24, eval_every=8, learning_rate=5e-4)
    res = d.run()
    print(f"\nretargeting A->B: loss {fmt(res.losses)}\n  held-out error toward B {res.heldout_curve}")
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert res.heldout_after <= 0.9 * res.heldout_before


def test_frozen_parameters_stay_bit_identical(env, models):
    teacher, student, data, held = models
    before = snapshot(student.model.diffusion_model)

    def only_output(name):  # e.g. "student blocks only" where the output blocks are the student's own
        return name.startswith("output_blocks.")

    res = distiller(env, teacher, student, data, held, steps=4, trainable=only_output, ema_decay=0.9).run()
    frozen = [k for k in before if not only_output(k)]
    trained = [k for k in before if only_output(k)]
    assert frozen and trained
    assert all(torch.equal(res.state_dict[k], before[k]) for k in frozen)
    assert sum(not torch.equal(res.state_dict[k], before[k]) for k in trained) >= len(trained) // 2


def test_nothing_to_train_is_a_typed_error(env, models):
    _, D, _ = env
    teacher, student, data, held = models
    with pytest.raises(D.DistillError, match="nothing to train") as e:
        distiller(env, teacher, student, data, held, steps=2, trainable=lambda name: False)
    assert e.value.input_name == "train" and "Fix:" in str(e.value)


def test_resume_reproduces_the_uninterrupted_run(env, models, tmp_path):
    _, D, _ = env
    teacher, student, data, held = models
    kw = dict(ema_decay=0.99, grad_accum=2, checkpoint_every=3, checkpoint_dir=str(tmp_path), seed=5)
    full = distiller(env, teacher, student, data, held, steps=6, **kw).run()
    assert [os.path.basename(c) for c in full.checkpoints] == ["distill_0000003.safetensors",
                                                                "distill_0000006.safetensors"]
    resumed = distiller(env, teacher, student, data, held, steps=6, **kw).run(resume=full.checkpoints[0])
    print(f"\nresume: uninterrupted {fmt(full.losses)}\n        resumed       {fmt(resumed.losses)}")
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    assert resumed.parts == full.parts
    assert same(resumed.state_dict, full.state_dict)
    assert resumed.heldout_before == full.heldout_before and resumed.heldout_after == full.heldout_after
    # the resumed run wrote its step-6 checkpoint beside the first one's, never over it
    assert os.path.basename(resumed.checkpoints[-1]) == "distill_0000006_1.safetensors"
    meta = D.read_checkpoint_meta(resumed.checkpoints[-1])
    assert meta["step"] == "6" and meta["format"] == D.CHECKPOINT_FORMAT
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cancel_between_steps(env, models, tmp_path):
    _, D, _ = env
    teacher, student, data, held = models
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    res = distiller(env, teacher, student, data, None, steps=5, checkpoint_dir=str(tmp_path)).run(
        cancel=cancel_after_two)
    assert res.cancelled and res.steps_done == 2 and len(res.checkpoints) == 1

    class Interrupted(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) > 4:
            raise Interrupted
        return False

    with pytest.raises(Interrupted):
        distiller(env, teacher, student, data, None, steps=5, checkpoint_dir=str(tmp_path / "b")).run(
            cancel=interrupt)
    written = os.listdir(tmp_path / "b")
    assert written == ["distill_0000001.safetensors"]  # the finished step is kept for resuming
    assert not any(m._forward_hooks for m in teacher.model.diffusion_model.modules())


def test_under_inference_mode_like_the_executor(env):
    """ComfyUI's executor runs nodes under torch.inference_mode: models loaded there hold inference tensors.
    Also: the tiny rule (proj_out) and gradient checkpointing give the same losses as without."""
    tm, D, _ = env
    with torch.inference_mode():
        teacher = tm.build("sd15", TEACHER3, model_channels=32, seed=4)
        student = tm.build("sd15", TINY, model_channels=32, seed=5)
        data, held = make_data(D, seed=3)
        drop_blocks(D, teacher.model.diffusion_model, topo(env, teacher), student.model.diffusion_model,
                    topo(env, student))
    t_before, s_before = snapshot(teacher.model.diffusion_model), snapshot(student.model.diffusion_model)
    lat_before = data.latents.clone()
    plan = D.feature_plan(topo(env, teacher), topo(env, student))
    assert [p.teacher for p in plan.points if p.name.startswith("down.1")] == ["input_blocks.5.1.proj_out"]
    runs = {}
    with torch.inference_mode():
        for ckpt in (False, True):
            runs[ckpt] = distiller(env, teacher, student, data, held, steps=3, gradient_checkpointing=ckpt).run()
    print(f"\ntiny rule: loss {fmt(runs[False].losses)}; with gradient checkpointing {fmt(runs[True].losses)}")
    for a, b in zip(runs[False].losses, runs[True].losses):
        assert a == pytest.approx(b, rel=1e-5)
    for k, v in runs[False].state_dict.items():
        torch.testing.assert_close(runs[True].state_dict[k], v, rtol=1e-4, atol=1e-6)
    assert not runs[True].state_dict["out.2.weight"].is_inference()
    assert same(snapshot(teacher.model.diffusion_model), t_before)
    assert same(snapshot(student.model.diffusion_model), s_before)
    assert torch.equal(data.latents, lat_before)


def test_sdpa_override_matches_comfyui_attention(env, models):
    _, D, _ = env
    teacher, *_ = models
    unet = teacher.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 768, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = unet(x, t, context=ctx, transformer_options={})
        ours = unet(x, t, context=ctx, transformer_options={"optimized_attention_override": D.sdpa_attention})
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_noising_matches_bk_sdm_scheduler(env, prediction):
    """Input, timestep and target through ComfyUI's model_sampling equal diffusers' DDPMScheduler (BK-SDM's)."""
    tm, D, _ = env
    diffusers = pytest.importorskip("diffusers")
    model = tm.build("sd15", tm.MINI_TOPOLOGY, model_channels=32, prediction=prediction)
    sched = D.NoiseSchedule(model.model.model_sampling, prediction=prediction)
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    nb = sched.noised(x0, noise, t)
    torch.testing.assert_close(nb.x_in, ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(nb.timesteps, t.float())
    want = noise if prediction == "eps" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(nb.target, want, rtol=1e-5, atol=1e-5)
    # a perfect prediction denoises back to x0 through the model's own calculate_denoised
    torch.testing.assert_close(sched.predict_x0(nb, nb.target), x0, rtol=1e-4, atol=1e-4)
    # the host-free stand-in agrees with ComfyUI's object
    alt = D.NoiseSchedule(prediction=prediction, sigmas=model.model.model_sampling.sigmas).noised(x0, noise, t)
    torch.testing.assert_close(alt.x_in, nb.x_in)
    torch.testing.assert_close(alt.target, nb.target)


def test_memory_estimate_and_refusal(env, models):
    _, D, _ = env
    teacher, student, data, held = models
    d = distiller(env, teacher, student, data, held, steps=2, batch_size=4)
    est = d.estimate_memory()
    n_student = sum(p.numel() for p in student.model.diffusion_model.parameters())
    assert est.grads == 4 * n_student and est.optimizer == 8 * n_student
    assert est.activations > 0 and est.with_(checkpointing=True).activations < est.activations
    assert est.with_(batch_size=8).activations == 2 * est.activations
    with pytest.raises(D.TrainingMemoryError) as e:
        d.check_memory(free_bytes=est.total // 3)
    msg = str(e.value)
    print(f"\nrefusal: {msg}")
    assert "GiB" in msg and "free on cpu" in msg and "gradient_checkpointing" in msg and "Fix:" in msg
    assert e.value.estimate.total == est.total
    d.check_memory(free_bytes=est.total * 2)  # enough: no error


def test_semantic_aware_supervision_with_a_vgg(env, models):
    """A-SDM's SAS: mid-block term + VGG term on the x0 previews (latent->RGB factors of the model's family)."""
    _, D, _ = env
    from distilled_unets.models.students.distill import vgg as V

    teacher, student, data, held = models
    g = torch.Generator().manual_seed(0)
    sd = {f"features.{i}.weight": torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
          for i, cin, cout in V.VGG16_CONVS}
    sd.update({f"features.{i}.bias": torch.zeros(cout) for i, _, cout in V.VGG16_CONVS})
    fmt_ = teacher.model.latent_format
    sas = V.SemanticVGGLoss(V.load_vgg16(sd), fmt_.latent_rgb_factors, fmt_.latent_rgb_factors_bias)
    res = distiller(env, teacher, student, data, held, steps=2, features="stages+mid", semantic=sas).run()
    assert set(res.parts) == {"task", "out", "feat", "mid", "vgg"}
    assert all(math.isfinite(v) and v > 0 for v in res.parts["vgg"])


# ---- the node ----------------------------------------------------------------------------------

BK_BASE = S.bk(S.SD1, "base")
NODE_KW = dict(steps=3, batch_size=2, gradient_accumulation=1, learning_rate=1e-3, loss_weights="bk-sdm",
               feature_points="stages+mid", train="all", seed=1, ema_decay=0.0, gradient_checkpointing=False,
               precision="auto", checkpoint_every=0)


@pytest.fixture(scope="module")
def node_env(env):
    tm, D, _ = env
    from distilled_unets.nodes import distill as N
    from distilled_unets.nodes import students

    with torch.inference_mode():  # models made as the executor makes them
        teacher = tm.build("sd15", tm.SD15_TOPOLOGY, model_channels=32, seed=11)
        base = tm.build("sd15", BK_BASE, model_channels=32, seed=12)
        asdm, _ = students.build_student(teacher, "asdm-m1", base)  # A-SDM: base student's level 0 + teacher
        bk_small, _ = students.build_student(teacher, "bk-small")
        g = torch.Generator().manual_seed(5)
        latents = {"samples": torch.randn(6, 4, 8, 8, generator=g)}
        pos, _ = tm.conditioning("sd15", tokens=8)
    return N, teacher, asdm, bk_small, latents, pos


def run_node(N, student, teacher, latents, cond, **kw):
    args = dict(NODE_KW, **kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = N.DistillStudentUNet.execute(student=student, teacher=teacher, latents=latents, conditioning=cond,
                                           **args)
    return out.args


def test_node_incubates_the_student_blocks_and_leaves_inputs_alone(env, node_env, tmp_path):
    import comfy.sample
    import folder_paths

    tm = env[0]
    N, teacher, asdm, _, latents, pos = node_env
    t_before, s_before = snapshot(teacher.model.diffusion_model), snapshot(asdm.model.diffusion_model)
    lat_before = latents["samples"].clone()
    model, loss_map, report = run_node(N, asdm, teacher, latents, pos, train="student blocks only")
    print(f"\nnode (A-SDM incubation): loss {fmt(loss_map['loss'])}\n{report}")
    assert model is not asdm and len(loss_map["loss"]) == 3 and "held-out output-KD error" in report
    assert "the last 1 of 6 samples" in report and "% of a BK-SDM run" in report
    bm = model.get_attachment("distilled_unets.block_map")
    own = set(bm.trainable_units("student blocks only"))
    got = snapshot(model.model.diffusion_model)
    frozen = [k for k in got if bm.unit_of(k) not in own]
    trained = [k for k in got if bm.unit_of(k) in own]
    assert frozen and trained
    assert all(torch.equal(got[k], s_before[k]) for k in frozen)  # the teacher's blocks stay bit-identical
    assert any(not torch.equal(got[k], s_before[k]) for k in trained)
    assert model.get_attachment("distilled_unets.recipe")["distilled"][-1]["steps"] == 3
    # inputs unchanged
    assert same(snapshot(teacher.model.diffusion_model), t_before)
    assert same(snapshot(asdm.model.diffusion_model), s_before)
    assert torch.equal(latents["samples"], lat_before)
    # the trained MODEL samples, and ComfyUI's own loss graph node plots the LOSS_MAP
    noise = comfy.sample.prepare_noise(tm.latent(8), 0)
    out = comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", pos, tm.conditioning("sd15")[1],
                              tm.latent(8), seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    from comfy_extras import nodes_train

    saved = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    try:
        graph = nodes_train.LossGraphNode
        if hasattr(graph, "plot_loss"):  # ComfyUI 0.3.x: V1 node
            graph().plot_loss(loss_map, "loss_graph")
        else:  # later: V3 node
            graph.execute(loss_map, "loss_graph")
    finally:
        folder_paths.set_temp_directory(saved)


def test_node_refuses_a_mode_with_nothing_to_train(node_env):
    N, teacher, _, bk_small, latents, pos = node_env
    from distilled_unets.models.students.distill import DistillError

    with pytest.raises(DistillError, match="nothing to train") as e:
        run_node(N, bk_small, teacher, latents, pos, train="student blocks only")
    assert "DistillStudentUNet" in str(e.value) and "input 'train'" in str(e.value)


def test_node_memory_refusal_before_any_step(node_env, monkeypatch):
    N, teacher, _, bk_small, latents, pos = node_env
    from distilled_unets.models.students.distill import TrainingMemoryError

    calls = []
    monkeypatch.setattr(N.mm, "get_free_memory", lambda *a, **k: 1 << 20)
    monkeypatch.setattr(N.comfy.utils, "ProgressBar", lambda *a, **k: calls.append(a))
    with pytest.raises(TrainingMemoryError) as e:
        run_node(N, bk_small, teacher, latents, pos)
    msg = str(e.value)
    assert msg.startswith("[DistillStudentUNet, input 'batch_size'] distillation needs ~") and "Fix:" in msg
    assert not calls  # refused before the first step
    with pytest.raises(TrainingMemoryError) as e:  # without checkpointing: the node's own memory input is offered
        run_node(N, bk_small, teacher, latents, pos, gradient_checkpointing=False)
    assert "turn on selective_recompute (the same loss and weights" in str(e.value)
    assert "ema_on_host" not in str(e.value)  # on the CPU it would change nothing


def test_node_memory_inputs_keep_the_loss(node_env):
    """selective_recompute and ema_on_host save memory only: the same losses and weights as without them."""
    N, teacher, _, bk_small, latents, pos = node_env
    kw = dict(gradient_checkpointing=False, ema_decay=0.9)
    model, plain, _ = run_node(N, bk_small, teacher, latents, pos, **kw)
    model2, lean, report = run_node(N, bk_small, teacher, latents, pos, selective_recompute=True, ema_on_host=True,
                                    **kw)
    assert lean["loss"] == plain["loss"] and len(plain["loss"]) == NODE_KW["steps"]
    assert same(snapshot(model2.model.diffusion_model), snapshot(model.model.diffusion_model))


def test_node_cancel_then_resume_reproduces_the_run(node_env, tmp_path, monkeypatch):
    import comfy.model_management as mm
    import folder_paths

    N, teacher, _, bk_small, latents, pos = node_env
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    kw = dict(steps=4, checkpoint_every=2, ema_decay=0.9)
    _, full, _ = run_node(N, bk_small, teacher, latents, pos, run_name="full", **kw)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 4:  # Cancel pressed while step 3 ran: stop before step 4
            raise mm.InterruptProcessingException()

    class OnlyThisNode:  # ComfyUI's own code may check for interrupts too; count only the node's checks
        def __getattr__(self, name):
            return interrupt if name == "throw_exception_if_processing_interrupted" else getattr(mm, name)

    monkeypatch.setattr(N, "mm", OnlyThisNode())
    with pytest.raises(mm.InterruptProcessingException):
        run_node(N, bk_small, teacher, latents, pos, run_name="cut", **kw)
    monkeypatch.setattr(N, "mm", mm)
    written = sorted(os.listdir(tmp_path / "distilled_unets" / "distill_checkpoints" / "cut"))
    assert written == ["cut_0000002.safetensors", "cut_0000003.safetensors"]
    assert "cut/cut_0000003.safetensors" in N.checkpoint_choices()
    _, resumed, report = run_node(N, bk_small, teacher, latents, pos, run_name="cut",
                                  resume_from="cut/cut_0000003.safetensors", **kw)
    print(f"\nnode resume: uninterrupted {fmt(full['loss'])}\n             resumed       {fmt(resumed['loss'])}")
    assert resumed["loss"] == full["loss"] and "resumed at step 3" in report


def test_node_sdxl_conditioning_goes_through_the_models_own_adm(env, node_env):
    tm = env[0]
    N = node_env[0]
    with torch.inference_mode():
        teacher = tm.build("sdxl", tm.SDXL_MINI_TOPOLOGY, seed=21)
        student = tm.build("sdxl", tm.SDXL_MINI_TOPOLOGY, seed=22)
        pos, _ = tm.conditioning("sdxl", tokens=8)
        latents = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode(False):
        data = N.make_data(teacher, latents, pos, which="train")
        c, d = pos[0]
        want = teacher.model.encode_adm(**dict(d, device=torch.device("cpu"), noise=latents["samples"][:1]))
    assert data._y.shape == (1, 2816) and torch.allclose(data._y, want.float())
    model, loss_map, report = run_node(N, student, teacher, latents, pos, steps=2, feature_points="stages")
    assert len(loss_map["loss"]) == 2 and all(math.isfinite(x) for x in loss_map["loss"])


def test_node_evaluates_keeps_the_best_and_bounds_its_checkpoints(node_env, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import comfy.utils
    import folder_paths
    from distilled_unets.models.students.distill import DiskSpaceError

    N, teacher, _, bk_small, latents, pos = node_env
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    kw = dict(steps=4, ema_decay=0.9, checkpoint_every=1, keep_checkpoints=2, eval_every=2)
    model, loss_map, report = run_node(N, bk_small, teacher, latents, pos, run_name="kept",
                                       best_metric="heldout_kd", **kw)
    print(f"\nnode evaluations: {loss_map['eval_heldout_kd']}")
    assert loss_map["eval_steps"] == [0, 2, 4] and loss_map["eval_heldout_kd"] == loss_map["heldout"]
    folder = tmp_path / "distilled_unets" / "distill_checkpoints" / "kept"
    assert sorted(os.listdir(folder)) == ["kept_0000003.safetensors", "kept_0000004.safetensors"]
    assert "(2 older deleted: keep_checkpoints 2)" in report and "checkpoint folder" in report
    value, step = min(zip(loss_map["eval_heldout_kd"], loss_map["eval_steps"]))
    assert f"holds the best evaluation's weights (heldout_kd {value:.5g} at step {step})" in report
    final, plain_map, _ = run_node(N, bk_small, teacher, latents, pos, run_name="plain", **kw)
    assert plain_map["loss"] == loss_map["loss"]  # the same run; only the weights handed out differ
    got, last = snapshot(model.model.diffusion_model), snapshot(final.model.diffusion_model)
    assert same(got, last) == (step == 4)  # the final weights exactly when the final evaluation was the best
    # the checkpoints it keeps must fit: refused before the first step, naming the node and the input
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 10))
    bars = []
    monkeypatch.setattr(comfy.utils, "ProgressBar", lambda *a, **k: bars.append(a))
    with pytest.raises(DiskSpaceError) as e:
        run_node(N, bk_small, teacher, latents, pos, run_name="full", **kw)
    assert str(e.value).startswith("[DistillStudentUNet, input 'keep_checkpoints'] the run would not fit on disk")
    assert "keep one checkpoint (keep_checkpoints 1)" in str(e.value) and not bars
