"""A real ComfyUI server for the server tests (and the browser tests): CPU, loopback, temp directories.

The server reads two model roots: the demo weights (``tools/demo_weights.py``, about 4 GB written once
per machine into the cache the quick start uses, ``~/.cache/distilled_unets/demo-models``), and a
per-session folder of deliberately broken files for the bad-input tests (about 20 MB). The pack is
loaded from this checkout through an extra ``custom_nodes:`` path. Without a ComfyUI the tests skip
with one line.

What the server writes goes to its own temporary folder, never the ComfyUI installation's (see
``tools/comfy_server.py``): the students the workflows save (up to 1 GB each, from the full-size demo
teacher) are deleted after each test, and the session's folders when the server stops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import demo_weights
import pytest
from _host import REPO as ROOT
from _host import find_comfyui, missing_reason
from comfy_server import ComfyServer, ServerError
from run_workflow import DEFAULT_DEMO_DIR, server_model_dirs

DEMO_DIR = DEFAULT_DEMO_DIR
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def _write_bad_models(root: Path) -> dict[str, str]:
    """Broken inputs for DistilledUNetLoader, as the user would have them on disk: name -> what it is."""
    dm = root / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    good = DEMO_DIR / "diffusion_models" / demo_weights.STUDENT_FILE
    data = good.read_bytes()
    (dm / "bad-truncated.safetensors").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[8:40] = b"\x00" * 32  # header JSON destroyed
    (dm / "bad-corrupt.safetensors").write_bytes(bytes(corrupt))
    (dm / "bad-empty.safetensors").write_bytes(b"")
    shutil.copyfile(DEMO_DIR / "vae" / demo_weights.VAE, dm / "bad-vae-as-unet.safetensors")
    shutil.copyfile(DEMO_DIR / "loras" / demo_weights.LORA, dm / "bad-lora-as-unet.safetensors")
    loras = root / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    lora = (DEMO_DIR / "loras" / demo_weights.LORA).read_bytes()
    (loras / "bad-truncated-lora.safetensors").write_bytes(lora[: len(lora) // 2])
    shutil.copyfile(DEMO_DIR / "vae" / demo_weights.VAE, loras / "bad-vae-as-lora.safetensors")
    half = dm / "bad-half-downloaded" / "unet"
    half.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEMO_DIR / "diffusion_models" / demo_weights.STUDENT_FOLDER / "config.json", half / "config.json")
    return {"bad-truncated.safetensors": "truncated", "bad-corrupt.safetensors": "corrupt header",
            "bad-empty.safetensors": "empty file", "bad-vae-as-unet.safetensors": "a VAE",
            "bad-lora-as-unet.safetensors": "a LoRA", "bad-half-downloaded/unet/": "folder without weights",
            "bad-truncated-lora.safetensors": "truncated LoRA", "bad-vae-as-lora.safetensors": "a VAE as LoRA"}


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    c = find_comfyui()
    if c is None or not (c / "main.py").is_file():
        pytest.skip(missing_reason())
    return c


@pytest.fixture(scope="session")
def demo_models() -> Path:
    return demo_weights.ensure(DEMO_DIR, sdxl=True, teacher=True)


@pytest.fixture(scope="session")
def bad_models(tmp_path_factory, demo_models) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad-models")
    yield root, _write_bad_models(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_server(comfyui_root, demo_models, bad_models, tmp_path_factory):
    """The session's server; its folders (output, user, temp, input, the models it saves) are removed when it
    stops, the log too unless a test failed (the tmp_path retention policy then keeps the session folder)."""
    workdir = tmp_path_factory.mktemp("comfy-server")
    server = ComfyServer(comfyui_root, [*server_model_dirs(None, demo_models), bad_models[0]], workdir=workdir)
    try:
        server.start()
    except ServerError as e:
        pytest.fail(f"ComfyUI did not start: {e}")
    yield server
    server.stop()
    for d in workdir.iterdir():
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        elif d != server.log_path:
            d.unlink()


@pytest.fixture(autouse=True)
def _saved_models_deleted(request):
    """Models a test's workflows saved (students of the 1.7 GB demo teacher: about 1 GB each) are deleted
    after it, so the session never holds more than one test's. Files only: ComfyUI's file-list cache stats
    every folder it listed, and a removed folder makes /object_info fail."""
    yield
    if "comfy_server" in request.fixturenames:
        for f in request.getfixturevalue("comfy_server").models_out.rglob("*"):
            if not f.is_dir():
                f.unlink()


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()
