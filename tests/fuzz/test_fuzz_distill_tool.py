"""tools/distill.py given broken files: exit 2 with the flag and the file named, never a traceback, no code run.

A handful of cases through the command's own ``main`` in this process, and the two that matter most (a cut-off
teacher, a shard that would run code) through the real command in a subprocess, where a traceback would show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ..layouts import write_training_dataset
from . import _mutate as M

pytestmark = pytest.mark.host
TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "distill.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_path):
    from distilled_unets.nodes.students import write_unet

    from . import _node_readers as NR

    root = tmp_path_factory.mktemp("tool")
    out = {"comfyui": str(comfyui_path)}
    for name, topo in (("teacher", NR.STUDENT), ("student", NR.MINI)):
        out[name] = write_unet(NR.tiny(topo, seed=5), str(root), lambda n, name=name: f"{name}.safetensors", "fp32",
                               name)
    g = torch.Generator().manual_seed(2)
    lat = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(4)]
    cond = [[[torch.randn(1, 8, 768, generator=g), {}]] for _ in range(4)]
    write_training_dataset(root / "data", lat, cond, shard_size=2)
    out["data"] = str(root / "data")

    # broken inputs, one per flag
    teacher = open(out["teacher"], "rb").read()
    (root / "cut-teacher.safetensors").write_bytes(teacher[: len(teacher) // 2])
    out["cut teacher"] = str(root / "cut-teacher.safetensors")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(root / "a-lora.safetensors"))
    out["lora as student"] = str(root / "a-lora.safetensors")
    for name, shard in (("code shard", {"latents": [{"samples": M.RunsCode()}], "conditioning": [[]]}),
                        ("wrong shard", {"latents": {"samples": torch.zeros(1, 4, 8, 8)}, "conditioning": [[]]})):
        folder = root / name.replace(" ", "-")
        shutil.copytree(root / "data", folder)
        torch.save(shard, str(folder / "shard_0001.pkl"))
        out[name] = str(folder)
    ckpt = NR.make_checkpoints(root / "ckpt")["checkpoint"]
    header, body = M.split_safetensors(ckpt.read_bytes())
    header["__metadata__"]["step"] = "two"
    (root / "damaged-checkpoint.safetensors").write_bytes(M.join_safetensors(header, body))
    out["damaged checkpoint"] = str(root / "damaged-checkpoint.safetensors")
    # the judging files of --vae / --clip-vision (the held-out images' evaluation)
    import demo_weights

    taesd = demo_weights.taesd("", seed=4)
    save_file(taesd, str(root / "taesd.safetensors"))
    out["taesd"] = str(root / "taesd.safetensors")
    save_file({k: v for k, v in taesd.items() if not k.startswith("taesd_decoder.9.")},
              str(root / "taesd-without-a-block.safetensors"))  # ComfyUI would leave that block uninitialised
    out["vae without a decoder block"] = str(root / "taesd-without-a-block.safetensors")
    cv = NR.tiny_clip_vision(root)
    cv["vision_model.encoder.layers.47.layer_norm1.weight"] = torch.ones(64)  # ComfyUI would build ViT-bigG/14
    save_file(cv, str(root / "claims-bigG.safetensors"))
    out["clip vision named as ViT-bigG/14"] = str(root / "claims-bigG.safetensors")
    out["root"] = root
    return out


def args(files, out, **over):
    a = {"--teacher": files["teacher"], "--student": files["student"], "--data": files["data"], "--out": str(out),
         "--steps": "2", "--comfyui": files["comfyui"]}
    a.update(over)
    return [x for k, v in a.items() for x in (k, v)] + ["--no-progress", "--threads", "1"]


CASES = [("--teacher", "cut teacher"), ("--student", "lora as student"), ("--data", "code shard"),
         ("--data", "wrong shard"), ("--resume", "damaged checkpoint")]


@pytest.mark.parametrize("flag,what", CASES, ids=[w for _, w in CASES])
def test_a_broken_file_exits_2_naming_the_flag_and_the_file(files, flag, what, tmp_path, caplog):
    import distill

    path = files[what]
    caplog.set_level("ERROR", logger="distilled_unets")
    code = distill.main(args(files, tmp_path / "out", **{flag: path}), own_logging=False)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == distill.EXIT_BAD_INPUT, errors
    assert len(errors) == 1 and os.path.basename(path) in errors[0] and flag in errors[0], errors
    assert not os.path.exists(M.SENTINEL)
    written = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not [f for f in written if f.endswith(".safetensors")], written


@pytest.mark.parametrize("flag,what", [("--teacher", "cut teacher"), ("--data", "code shard")],
                         ids=["cut teacher", "code shard"])
def test_the_real_command_prints_no_traceback(files, flag, what, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, TOOL, *args(files, tmp_path / "out", **{flag: files[what]})], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-3000:]
    assert "Traceback" not in p.stdout and os.path.basename(files[what]) in p.stdout and flag in p.stdout, \
        p.stdout[-3000:]
    assert not os.path.exists(M.SENTINEL)


def test_the_damaged_checkpoint_names_its_field(files, tmp_path, caplog):
    """The metadata check says which field is damaged (here: a step that is not a number)."""
    import distill

    caplog.set_level("ERROR", logger="distilled_unets")
    distill.main(args(files, tmp_path / "out", **{"--resume": files["damaged checkpoint"]}), own_logging=False)
    assert any("step 'two' is not a step number" in r.getMessage() for r in caplog.records), \
        json.dumps([r.getMessage() for r in caplog.records])


@pytest.mark.parametrize("flag,what", [("--vae", "vae without a decoder block"),
                                       ("--clip-vision", "clip vision named as ViT-bigG/14")],
                         ids=["vae without a decoder block", "clip vision named as ViT-bigG/14"])
def test_a_broken_judging_file_exits_2_naming_the_flag_and_the_file(files, flag, what, tmp_path, caplog):
    """--vae and --clip-vision (the held-out images' evaluation) are read before the first step: refused from
    their tensor shapes, before ComfyUI builds anything (under the harness's address-space cap)."""
    import distill

    from ._harness import limits

    over = {flag: files[what], "--eval-every": "1"}
    if flag == "--clip-vision":
        over["--vae"] = files["taesd"]
    caplog.set_level("ERROR", logger="distilled_unets")
    with limits():
        code = distill.main(args(files, tmp_path / "out", **over), own_logging=False)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == distill.EXIT_BAD_INPUT, errors
    assert len(errors) == 1 and os.path.basename(files[what]) in errors[0] and flag in errors[0], errors
    written = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not [f for f in written if f.endswith(".safetensors")], written
