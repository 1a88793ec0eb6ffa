"""Every shipped workflow says what to download: each model file a node names (a loader's widget value)
carries the metadata ComfyUI's frontend reads, ``properties.models = [{name, url, directory}]``, so a
workflow opened without its models lists them with their sources and folders (the browser test checks
the editor's list itself, on both frontends).

What the frontends need, read from their bundles (``comfyui_frontend_package`` 1.27.10 and 1.49.6):
an entry is used when its ``name`` equals one of the node's string widget values; it is offered for
download only from ``https://huggingface.co/`` (or civitai) and, in 1.27.10, only for a ``.safetensors``
or ``.sft`` name; ``directory`` must be a ComfyUI models folder, and for core loaders the one the frontend
itself maps the node to (``checkpoints`` for CheckpointLoaderSimple ...), or the entry is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
DOWNLOADABLE = (".safetensors", ".sft")
# loader node -> the models folder its file lives in (core nodes: the folder the frontend maps them to)
LOADER_FOLDERS = {
    "DistilledUNetLoader": "diffusion_models", "DistilledLoraLoader": "loras",
    "CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models", "LoraLoader": "loras",
    "LoraLoaderModelOnly": "loras", "VAELoader": "vae", "CLIPLoader": "text_encoders",
    "DualCLIPLoader": "text_encoders", "ControlNetLoader": "controlnet", "UpscaleModelLoader": "upscale_models",
}
NOT_LOADERS = ("Note", "MarkdownNote", "SaveImage", "PreviewImage")


def _model_values(node: dict) -> list[str]:
    """The node's widget values that name a model file or folder."""
    wv = node.get("widgets_values") or []
    values = wv.values() if isinstance(wv, dict) else wv
    strings = [v for v in values if isinstance(v, str)]
    found = [v for v in strings if v.lower().endswith(MODEL_EXTENSIONS)]
    if node["type"] in LOADER_FOLDERS and not found and strings:
        found = strings[:1]  # a loader's first string widget is its file, whatever it is called
    return found


def test_workflows_exist():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_model_file_has_download_metadata(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    checked = 0
    for node in wf["nodes"]:
        if node["type"] in NOT_LOADERS:
            continue
        where = f"{path.name}: node {node['id']} ({node['type']})"
        models = (node.get("properties") or {}).get("models")
        values = _model_values(node)
        if not values:
            assert not models, f"{where}: properties.models names files no widget uses: {models}"
            continue
        assert isinstance(models, list) and models, f"{where}: {values} without properties.models"
        by_name = {m.get("name"): m for m in models}
        assert set(by_name) == set(values), f"{where}: properties.models {sorted(by_name)} != widget values {values}"
        for value in values:
            m = by_name[value]
            assert not value.endswith("/"), f"{where}: {value!r} is a folder; the editor can only fetch one file"
            assert set(m) >= {"name", "url", "directory"} and all(isinstance(m[k], str) and m[k] for k in m), \
                f"{where}: incomplete entry {m}"
            assert value.endswith(DOWNLOADABLE), f"{where}: {value!r}: frontend 1.27 offers only .safetensors/.sft"
            assert m["url"].startswith("https://huggingface.co/") and "/resolve/" in m["url"], \
                f"{where}: {m['url']!r} is not a Hugging Face file link (https://huggingface.co/<repo>/resolve/...)"
            assert m["url"].rsplit("/", 1)[-1].split("?")[0].endswith(DOWNLOADABLE), \
                f"{where}: {m['url']!r} does not point at a safetensors file"
            assert m["directory"] == LOADER_FOLDERS.get(node["type"], m["directory"]), \
                f"{where}: directory {m['directory']!r}, the node reads {LOADER_FOLDERS[node['type']]!r}"
            checked += 1
    assert checked, f"{path.name}: no model file found in any node"


def test_same_file_same_source_everywhere():
    """A file name means one download in every workflow (the editor deduplicates by URL)."""
    seen: dict[str, tuple[str, str, str]] = {}
    for path in WORKFLOWS:
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            for m in (node.get("properties") or {}).get("models", []):
                first = seen.setdefault(m["name"], (m["url"], m["directory"], path.name))
                assert first[:2] == (m["url"], m["directory"]), f"{m['name']}: {path.name} and {first[2]} differ"
