# ruff: noqa: T201  (the equivalence figures are printed; see them with -s)
"""The headless trainer tools/distill.py: one process, several under torchrun (gloo on the CPU), two "nodes" on the
loopback address, a rank killed mid-run, Ctrl-C, resume across scales, non-finite data, and its output files as
Load Distilled UNet reads them.

Tiny random UNets written with the pack's own saver and a dataset folder written as ComfyUI's Save Training
Dataset writes it, all under tmp_path. Every launch is a subprocess with a timeout and one thread per process;
single-process cases that need no launcher of their own run ``distill.main`` in this process.

Stated margins. Per-step losses (and each term): within 1e-5 relative at any process count. Final weights: the
whole student within 1e-5 relative (L2 norm of the difference over the norm of the weights); single tensors
differ more where a gradient is float32 rounding noise (biases that feed a GroupNorm, which removes them): AdamW
normalises that noise to steps of size ~lr, so two summation orders (one process vs DDP's all-reduce) move
those few tensors apart by up to ~1e-3 of their size at lr 5e-5 (printed with -s). A run resumed from a
checkpoint, at the same scale, is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from distilled_unets.models.structure.topology import Topology

from ..unit.test_distill_datasets import write_dataset
from ._torchrun import free_port, torchrun_env

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "distill.py")
TEACHER = Topology("sd1", 320, (1, 2), (2, 2), (1, 1, 1, 1), (1, 1, 1, 1, 1, 1), 1, 768, False)
STUDENT = Topology("sd1", 320, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), 1, 768, False)
STEPS, EVERY = 8, 4
SAMPLES, SHARD = 16, 2  # one shard of NaN samples hits at most 2 of the 4 steps of an epoch (the streak limit is 5)
LAUNCH_TIMEOUT = 240
COMMON = ["--lr", "5e-5", "--ema-decay", "0.9", "--seed", "3", "--no-progress", "--heldout-fraction", "0"]


# ------------------------------------------------------------------------------------------------
# helpers




def trainer_args(files, out, *extra, batch=4, steps=STEPS, data=None) -> list[str]:
    return ["--teacher", files["teacher"], "--student", files["student"], "--data", data or files["data"],
            "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--checkpoint-every", str(EVERY),
            "--comfyui", files["comfyui"], *COMMON, *extra]


def python(args) -> list[str]:
    return [sys.executable, TOOL, *args]


def torchrun(nproc: int, args, *launcher) -> list[str]:
    rdzv = list(launcher) or ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rdzv, TOOL, *args]


def launch(cmd, timeout=LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    p.output = p.stdout
    return p


def ok(p) -> str:
    assert p.returncode == 0, p.output[-4000:]
    return p.output


def losses(out) -> list[dict]:
    from distilled_unets.models.students.distill.runs import read_csv

    return read_csv(os.path.join(str(out), "losses.csv"))


def student(out, steps=STEPS) -> dict:
    from safetensors.torch import load_file

    names = sorted(f for f in os.listdir(out) if f.startswith(f"student-{steps:05d}"))
    assert names, os.listdir(out)
    sd = load_file(os.path.join(str(out), names[-1]))
    return {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}


def same_losses(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["skipped"] for r in a] == [r["skipped"] for r in b]
    for ra, rb in zip(a, b):
        for k in rb:
            if k not in ("step", "skipped"):
                assert ra[k] == pytest.approx(rb[k], rel=rel, nan_ok=True), (ra["step"], k, ra[k], rb[k])


def weight_gap(a: dict, b: dict) -> tuple[float, float, str]:
    """(||a - b|| / ||b|| over all tensors, the worst single tensor's max|a - b| / max|b|, its name)."""
    assert a.keys() == b.keys()
    num = den = 0.0
    worst, where = 0.0, ""
    for k in b:
        d = (a[k].double() - b[k].double())
        num += float((d * d).sum())
        den += float((b[k].double() ** 2).sum())
        r = float(d.abs().max()) / max(float(b[k].abs().max()), 1e-12) if b[k].numel() else 0.0
        if r > worst:
            worst, where = r, k
    return math.sqrt(num / den), worst, where


def same_weights(a, b, what: str, rel=1e-5):
    gap, worst, where = weight_gap(a, b)
    print(f"\n{what}: weights {gap:.2e} relative (worst tensor {worst:.1e}: {where})")
    assert gap <= rel, (what, gap, worst, where)


def bit_identical(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_partial_files(out):
    left = [f for f in os.listdir(out) if f.startswith(".") or f.endswith((".writing", ".tmp"))]
    assert not left, left


@pytest.fixture
def inproc():
    """``distill.main(argv)`` in this process (logging left to pytest)."""
    import distill

    return lambda args: distill.main(args, own_logging=False)


# ------------------------------------------------------------------------------------------------
# files and the reference runs


def write_run_files(root, comfyui_path) -> dict:
    """A tiny teacher and student written by the pack's saver and a Save Training Dataset folder under ``root``:
    the files a trainer test runs on (paths, the ComfyUI folder, the samples written)."""
    from distilled_unets.nodes.students import write_unet

    from . import _tiny_models as tm

    torch.set_num_threads(1)
    out = {"comfyui": str(comfyui_path), "root": root}
    for name, topo, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        m = tm.build("sd15", topo, model_channels=32, seed=seed)
        out[name] = write_unet(m, str(root), lambda n, name=name: f"{name}.safetensors", "fp32", name)
    out["data"] = str(root / "data")
    out["samples"] = write_dataset(out["data"], [(8, 8)] * SAMPLES, shard_size=SHARD, tokens=8, width=768, seed=4)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_path):
    return write_run_files(tmp_path_factory.mktemp("trainer"), comfyui_path)


@pytest.fixture(scope="module")
def ref1(files):
    """1 process x batch 4 (plain python)."""
    out = files["root"] / "ref1"
    ok(launch(python(trainer_args(files, out))))
    return out


@pytest.fixture(scope="module")
def ref2(files):
    """2 processes x batch 2 (torchrun, gloo)."""
    out = files["root"] / "ref2"
    ok(launch(torchrun(2, trainer_args(files, out, batch=2))))
    return out


# ------------------------------------------------------------------------------------------------
# same results at any scale


def test_two_processes_give_the_one_process_run(files, ref1, ref2):
    a, b = losses(ref2), losses(ref1)
    assert len(b) == STEPS and not any(r["skipped"] for r in b)
    same_losses(a, b)
    same_weights(student(ref2), student(ref1), "2 processes x 2 vs 1 x 4")
    for out in (ref1, ref2):
        assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == [
            "checkpoint_0000004.safetensors", "checkpoint_0000008.safetensors"]
        no_partial_files(out)


def test_the_node_on_the_same_data_gives_the_trainer_run(files, ref1):
    """DistillStudentUNet's own function on the dataset's latents and captions, with the same settings."""
    from distilled_unets.models.students.distill.datasets import load_shard, shard_files
    from distilled_unets.nodes.distill import distill
    from distilled_unets.nodes.host.unet import load_distilled_unet, unet_weights

    lats, conds = [], []
    for f in shard_files(files["data"]):
        la, co = load_shard(f, mmap=False)
        lats += [x["samples"] for x in la]
        conds += [c[0] for c in co]
    latents = {"samples": torch.cat(lats)}
    teacher = load_distilled_unet(files["teacher"])[0]
    stud = load_distilled_unet(files["student"], "fp32")[0]
    model, loss_map, report = distill(
        stud, teacher, latents, conds, steps=STEPS, batch_size=4, gradient_accumulation=1, learning_rate=5e-5,
        loss_weights="bk-sdm", feature_points="stages", train="all", seed=3, ema_decay=0.9,
        gradient_checkpointing=False, heldout_latents={"samples": latents["samples"][:2]},
        heldout_conditioning=conds[:2])
    rows = losses(ref1)
    for r, node_loss, task in zip(rows, loss_map["loss"], loss_map["loss_task"]):
        assert node_loss == pytest.approx(r["loss"], rel=1e-5) and task == pytest.approx(r["task"], rel=1e-5)
    assert len(loss_map["loss"]) == len(rows) == STEPS
    same_weights({k: v.float() for k, v in unet_weights(model).items()}, student(ref1), "node vs trainer")


def test_a_two_process_checkpoint_resumes_in_one_process_and_back(files, ref1, ref2, inproc):
    # 2 -> 1, in this process, into a folder of this run (its run.json: the same global batch) where a killed
    # writer left a temporary file and half a csv row
    out = files["root"] / "resume21"
    out.mkdir()
    (out / "run.json").write_bytes((ref2 / "run.json").read_bytes())
    (out / ".checkpoint_0000004_1.safetensors.999.writing").write_bytes(b"half")
    (out / "losses.csv").write_text("step,loss\n1,0.5\n2,0.")
    assert inproc(trainer_args(files, out, "--resume", str(ref2 / "checkpoint_0000004.safetensors"))) == 0
    same_losses(losses(out), losses(ref1))
    same_weights(student(out), student(ref1), "2-process checkpoint resumed in 1 process")
    no_partial_files(out)
    # 1 -> 2, under torchrun
    out = files["root"] / "resume12"
    ok(launch(torchrun(2, trainer_args(files, out, "--resume", str(ref1 / "checkpoint_0000004.safetensors"),
                                       batch=2))))
    same_losses(losses(out), losses(ref1))
    same_weights(student(out), student(ref1), "1-process checkpoint resumed in 2 processes")


def test_two_nodes_of_one_process_on_the_loopback_address(files, ref1):
    out = files["root"] / "nodes2"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", TOOL, *trainer_args(files, out, batch=2)],
        env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 process(es)" in outs[0]
    same_losses(losses(out), losses(ref1))
    same_weights(student(out), student(ref1), "2 nodes x 1 process vs 1 x 4")


def test_a_killed_rank_restarts_and_ends_with_the_uninterrupted_weights(files, ref2):
    import psutil

    out = files["root"] / "killed"
    cmd = torchrun(2, trainer_args(files, out, batch=2), "--max-restarts=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}")
    logf = open(files["root"] / "killed.log", "w+")
    p = subprocess.Popen(cmd, env=torchrun_env(), stdout=logf, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while p.poll() is None and killed is None and time.monotonic() < deadline:
            if (out / "checkpoint_0000004.safetensors").exists():
                for child in psutil.Process(p.pid).children(recursive=True):
                    try:
                        if child.environ().get("LOCAL_RANK") == "1":
                            os.kill(child.pid, signal.SIGKILL)
                            killed = child.pid
                            break
                    except psutil.Error:
                        continue
            time.sleep(0.01)
        p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    logf.seek(0)
    text = logf.read()
    assert killed is not None, text[-3000:]
    assert p.returncode == 0, text[-4000:]
    assert "resume: the latest checkpoint of this run in --out" in text, "the restarted job did not resume by itself"
    bit_identical(student(out), student(ref2))
    same_losses(losses(out), losses(ref2), rel=0)
    no_partial_files(out)


def test_ctrl_c_writes_a_checkpoint_and_the_same_command_resumes(files, ref1, inproc):
    out = files["root"] / "ctrlc"
    args = trainer_args(files, out)
    p = subprocess.Popen(python(args), env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:
            if (out / "losses.csv").exists() and len((out / "losses.csv").read_text().splitlines()) >= 3:
                p.send_signal(signal.SIGINT)
                break
            time.sleep(0.01)
        text = p.communicate(timeout=LAUNCH_TIMEOUT)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, text[-3000:]
    assert "stopping after this step" in text and "the same command resumes from" in text, text[-2000:]
    stopped = len(losses(out))
    assert 2 <= stopped < STEPS and (out / f"checkpoint_{stopped:07d}.safetensors").exists()
    assert not list(out.glob("student-*"))
    assert inproc(args) == 0
    bit_identical(student(out), student(ref1))
    same_losses(losses(out), losses(ref1), rel=0)


def test_a_finished_run_started_again_does_nothing_and_another_run_is_refused(files, ref1, inproc, caplog):
    before = sorted(os.listdir(ref1))
    assert inproc(trainer_args(files, ref1)) == 0
    assert sorted(os.listdir(ref1)) == before
    # same folder, other settings: the latest checkpoint is another run's
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        code = inproc(trainer_args(files, ref1, "--max-grad-norm", "0.5"))
    assert code == 2
    assert sorted(os.listdir(ref1)) == before


def test_a_checkpoint_at_the_last_step_resumes_into_the_result(files, ref1, inproc):
    """Engine change: a checkpoint at ``steps`` resumes into the run's result instead of being refused."""
    out = files["root"] / "final"
    assert inproc(trainer_args(files, out, "--resume", str(ref1 / "checkpoint_0000008.safetensors"))) == 0
    bit_identical(student(out), student(ref1))
    same_losses(losses(out), losses(ref1), rel=0)


# ------------------------------------------------------------------------------------------------
# non-finite data and weights


def poison(src: str, dst: str, shards) -> None:
    """A copy of the dataset folder with every value of the given shards NaN."""
    import shutil

    shutil.copytree(src, dst)
    for s in shards:
        path = os.path.join(dst, f"shard_{s:04d}.pkl")
        data = torch.load(path, weights_only=True)
        for lat in data["latents"]:
            lat["samples"].fill_(float("nan"))
        torch.save(data, path)


def test_a_nan_shard_skips_its_steps_on_every_rank_and_the_run_goes_on(files, inproc):
    data = str(files["root"] / "nan_data")
    poison(files["data"], data, [3])
    one, two = files["root"] / "nan1", files["root"] / "nan2"
    assert inproc(trainer_args(files, one, data=data)) == 0
    ok(launch(torchrun(2, trainer_args(files, two, data=data, batch=2))))
    rows = losses(one)
    skipped = [r["step"] for r in rows if r["skipped"]]
    print(f"\nNaN shard: skipped steps {skipped} of {STEPS}")
    assert 0 < len(skipped) < STEPS and all(math.isnan(r["loss"]) for r in rows if r["skipped"])
    same_losses(losses(two), rows)
    s1 = student(one)
    assert all(bool(torch.isfinite(v).all()) for v in s1.values())
    same_weights(student(two), s1, "NaN shard: 2 processes vs 1")


def test_all_nan_data_stop_with_the_typed_error_naming_the_last_good_checkpoint(files, inproc, caplog):
    data = str(files["root"] / "all_nan")
    poison(files["data"], data, range(SAMPLES // SHARD))
    one, two = files["root"] / "allnan1", files["root"] / "allnan2"
    extra = ("--max-nonfinite-steps", "2")
    with caplog.at_level(logging.ERROR, logger="distilled_unets"):
        assert inproc(trainer_args(files, one, *extra, data=data)) == 3
    assert "non-finite" in caplog.text and "checkpoint_0000002.safetensors" in caplog.text
    p = launch(torchrun(2, trainer_args(files, two, *extra, data=data, batch=2)))
    assert p.returncode != 0 and "exitcode  : 3" in p.output, p.output[-3000:]
    assert "last good checkpoint: " + str(two / "checkpoint_0000002.safetensors") in p.output
    for out in (one, two):
        assert not list(out.glob("student-*"))
        assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint_0000002.safetensors"]


def test_the_trainer_never_writes_a_student_with_non_finite_weights(files, tmp_path):
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes.host.distill import write_student
    from distilled_unets.nodes.host.unet import load_distilled_unet, topology_of

    stud = load_distilled_unet(files["student"], "fp32")[0]
    state = {k: v.clone() for k, v in stud.model.diffusion_model.state_dict().items()}
    state["out.2.weight"][0, 0, 0, 0] = float("inf")
    for replace in (None, "student-best.safetensors"):
        with pytest.raises(D.NonFiniteError, match="out.2.weight"):
            write_student(str(tmp_path), state, topology=topology_of(stud), prediction="eps", zsnr=False,
                          block_map=None, recipe={}, dtype="fp32", title="t", name_for=lambda n: f"s{n}.safetensors",
                          replace=replace)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# a preset student from a checkpoint file, read back by the loader


def test_a_preset_student_from_a_checkpoint_loads_with_its_recipe(files, tmp_path, inproc):
    from distilled_unets.models.structure import structures as S
    from distilled_unets.nodes.host.unet import load_distilled_unet, unet_weights
    from safetensors.torch import save_file

    from . import _tiny_models as tm

    teacher = tm.build("sd15", S.SD1, model_channels=32, seed=5)
    ckpt = {f"model.diffusion_model.{k}": v.contiguous() for k, v in unet_weights(teacher).items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # a checkpoint: VAE and CLIP too
    ckpt["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(ckpt, str(tmp_path / "sd15.safetensors"))
    out = tmp_path / "preset"
    args = ["--teacher", str(tmp_path / "sd15.safetensors"), "--preset", "bk-small", "--data", files["data"],
            "--out", str(out), "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--save-dtype",
            "fp16", "--comfyui", files["comfyui"], "--no-progress"]
    assert inproc(args + ["--heldout-data", files["data"]]) == 0
    assert sorted(os.listdir(out)) == ["dataset_digests.json", "eval.csv", "losses.csv", "run.json",
                                       "student-00001.safetensors"]
    model, info = load_distilled_unet(str(out / "student-00001.safetensors"))
    assert "preset bk-small" in info and "Distilled here: 1 steps, 1 samples" in info
    assert "held-out output-KD error" in info
    assert model.get_attachment("distilled_unets.block_map") is not None
    # another run into the same folder is refused: nothing of the first is overwritten or mixed
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert inproc(args + ["--heldout-data", files["data"], "--seed", "1"]) == 2
    assert inproc(args + ["--heldout-data", files["data"], "--resume", "none"]) == 2
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
