"""tools/evaluate.py given broken files: exit 2 with the flag and the file named, never a traceback, no code run,
nothing written; the same for tools/distill.py's --vae and --clip-vision.

The judging files (--prompts, --inception, --reference-stats, --clip-vision) are checked before any model loads,
so the teacher and the student here are files that merely exist. The cases run through the command's own ``main``
in this process (under the harness's time limit and address-space cap), and the one that matters most (an
Inception pickle that would run code) through the real command in a subprocess, where a traceback would show.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .._evaluate_tool import TOOL, main
from . import _mutate as M

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_path):
    from . import _node_readers as NR
    from ._readers import inception_state

    root = tmp_path_factory.mktemp("evaltool")
    out = {"comfyui": str(comfyui_path), "root": root}
    for name in ("teacher", "student"):  # never read: every case fails before the models load
        (root / f"{name}.safetensors").write_bytes(b"not read")
        out[name] = str(root / f"{name}.safetensors")
    (root / "prompts.txt").write_text("a red cube\na blue sphere\n")
    out["prompts"] = str(root / "prompts.txt")
    sd = inception_state()
    torch.save(sd, str(root / "pt_inception-2015-12-05-6726825d.pth"))
    out["inception"] = str(root / "pt_inception-2015-12-05-6726825d.pth")

    # broken inputs, one or two per flag
    (root / "latin1.txt").write_bytes("caf\u00e9 terrace\n".encode("latin-1"))
    out["latin-1 prompts"] = str(root / "latin1.txt")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out["binary prompts"] = str(root / "image.txt")
    raw = open(out["inception"], "rb").read()
    (root / "cut-inception.pth").write_bytes(raw[: len(raw) // 3])
    out["cut inception"] = str(root / "cut-inception.pth")
    data, _ = M.code_pickle(None, {"Conv2d_1a_3x3.conv.weight": M.RunsCode()}, form="zip")
    (root / "code-inception.pth").write_bytes(data)
    out["inception that runs code"] = str(root / "code-inception.pth")
    (root / "bomb.npz").write_bytes(M.zip_with_bomb({"mu.npy": M.npy(np.zeros(2048))}, "sigma.npy", 24_000))
    out["statistics of 4.6 GB"] = str(root / "bomb.npz")
    buf = io.BytesIO()
    np.savez(buf, mu=np.array([M.RunsCode()], dtype=object), sigma=np.eye(2048))
    (root / "code-stats.npz").write_bytes(buf.getvalue())
    out["statistics that run code"] = str(root / "code-stats.npz")
    sd = {k: v.contiguous() for k, v in NR.tiny_clip_vision(root).items()}
    sd["vision_model.encoder.layers.47.layer_norm1.weight"] = torch.ones(64)  # ComfyUI would build ViT-bigG/14
    save_file(sd, str(root / "claims-bigG.safetensors"))
    out["tiny tensors named as ViT-bigG/14"] = str(root / "claims-bigG.safetensors")
    return out


def args(files, out, **over):
    a = {"--teacher": files["teacher"], "--student": files["student"], "--prompts": files["prompts"],
         "--out": str(out), "--comfyui": files["comfyui"], "--width": "64", "--height": "64", "--steps": "1"}
    a.update(over)
    return [x for k, v in a.items() for x in (k, v)] + ["--no-progress"]




CASES = [("--prompts", "latin-1 prompts"), ("--prompts", "binary prompts"), ("--inception", "cut inception"),
         ("--inception", "inception that runs code"), ("--reference-stats", "statistics of 4.6 GB"),
         ("--reference-stats", "statistics that run code"), ("--clip-vision", "tiny tensors named as ViT-bigG/14")]


@pytest.mark.parametrize("flag,what", CASES, ids=[w for _, w in CASES])
def test_a_broken_file_exits_2_naming_the_flag_and_the_file(files, flag, what, tmp_path, caplog):
    from ._harness import limits

    path = files[what]
    over = {flag: path}
    if flag == "--reference-stats":
        over["--inception"] = files["inception"]
    caplog.set_level("ERROR", logger="distilled_unets")
    with limits():  # the harness's time limit and address-space cap: gigabytes claimed must not be allocated
        code = main(args(files, tmp_path / "out", **over))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2, errors
    assert len(errors) == 1 and os.path.basename(path) in errors[0] and flag in errors[0], errors
    assert "tools/evaluate.py" in errors[0] and "Fix:" in errors[0], errors
    assert not os.path.exists(M.SENTINEL)
    assert not (tmp_path / "out").exists()


def test_the_real_command_prints_no_traceback(files, tmp_path):
    flag, what = "--inception", "inception that runs code"
    over = {flag: files[what]}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, TOOL, *args(files, tmp_path / "out", **over)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-3000:]
    assert "Traceback" not in p.stdout and os.path.basename(files[what]) in p.stdout and flag in p.stdout, \
        p.stdout[-3000:]
    assert not os.path.exists(M.SENTINEL) and not (tmp_path / "out").exists()
