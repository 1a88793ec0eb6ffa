"""Every shipped workflow runs in a real ComfyUI server, as people run it: UI JSON -> /object_info
conversion -> POST /prompt -> /history -> PNG files. Plus unknown nodes, bad inputs and a soak run.

The models are the tiny random demo weights (``tools/demo_weights.py``) swapped in for the files the
workflow names; steps and size are cut down so the whole file runs in about a minute on a CPU.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import demo_weights
import psutil
import pytest
from _workflows import lacking_nodes
from comfy_server import PromptRejected, execution_error
from PIL import Image
from run_workflow import expected_sizes, prepare, run_one
from ui_to_api import UnknownNodeError, convert

from .conftest import WORKFLOWS

pytestmark = pytest.mark.server

SIZE = (64, 64)
SOAK_PROMPTS = 100
SOAK_RSS_BOUND_MB = 200  # resident memory growth allowed over the 100 prompts, after a warm-up


def _sd15_prompt(server, demo_models, seed=0, workflow="distilled_unet_sd15"):
    wf = json.loads((WORKFLOWS[0].parent / f"{workflow}.json").read_text())
    prompt, _ = prepare(server, wf, demo_models, steps=1, size=SIZE, force_demo=True)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return prompt


def _loader_id(prompt):
    return next(n for n, v in prompt.items() if v["class_type"] == "DistilledUNetLoader")


def _node(prompt, class_type):
    return next(v for v in prompt.values() if v["class_type"] == class_type)


def test_workflows_exist():
    assert WORKFLOWS, "workflows/ holds no .json"


def _dataset_workflow_ready(server, object_info, path) -> Path | None:
    """For a workflow that saves a training dataset: skip where this ComfyUI lacks the nodes, or where the
    server would write the dataset outside its own folders; returns the datasets folder it writes to."""
    missing = lacking_nodes(path.stem, object_info)
    if missing:
        pytest.skip(f"{path.name} needs ComfyUI 0.33's dataset nodes; this ComfyUI lacks {', '.join(missing)}")
    if "SaveTrainingDataset" not in {n["type"] for n in json.loads(path.read_text())["nodes"]}:
        return None
    root = Path(server.get_json("/internal/folder_paths")["datasets"][0]).resolve()
    if server.workdir.resolve() not in root.parents:
        pytest.skip(f"the server would save the dataset into {root}, not a folder of its own (tools/comfy_server.py "
                    "must list a datasets folder of the server's first)")
    return root


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_server(comfy_server, object_info, demo_models, path, tmp_path):
    """Writes PNGs (a few KB) to tmp_path and, for the student workflows, a student of the demo teacher (about
    1 GB) to the server's own models folder, deleted after the test."""
    datasets = _dataset_workflow_ready(comfy_server, object_info, path)
    comfy_server.free()  # the distillation needs ~6 GB on top of its teacher: nothing else held in memory
    res = run_one(comfy_server, path, tmp_path, demo_models, steps=2, size=SIZE, force_demo=True, timeout=300)
    savers = [n for n in res["prompt"].values() if n["class_type"] == "SaveStudentUNet"]
    saved = sorted((comfy_server.models_out / "diffusion_models").rglob("*.safetensors"))
    # the student lands in the server's folder (listed first), never in the ComfyUI installation's models/
    assert sorted(p.name.rsplit("_", 2)[0] for p in saved) == sorted(
        n["inputs"]["filename_prefix"].rsplit("/", 1)[-1] for n in savers), saved
    if datasets is not None:  # saved, then (in the same run, loaded after the save) distilled from
        saver = next(n for n in res["prompt"].values() if n["class_type"] == "SaveTrainingDataset")
        folder = datasets / saver["inputs"]["folder_name"]
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["num_samples"] == len(demo_weights.DEMO_IMAGES) and (folder / "shard_0000.pkl").is_file()
    assert res["images"], f"{path.name} produced no image"
    sizes = expected_sizes(res["prompt"])
    assert sizes == {SIZE}
    for img in res["images"]:
        assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(img) as im:
            assert im.format == "PNG" and im.size == SIZE
            # SaveImage embeds the UI workflow, as when the editor queues it
            assert json.loads(im.info["workflow"])["nodes"]


def test_run_twice_keeps_both_images(comfy_server, demo_models, tmp_path):
    """tools/run_workflow.py numbers its copies like ComfyUI's savers: the second run adds, never replaces."""
    path = WORKFLOWS[0]
    first = run_one(comfy_server, path, tmp_path, demo_models, steps=1, size=SIZE, force_demo=True, timeout=300)
    kept = {p: p.read_bytes() for p in first["images"]}
    second = run_one(comfy_server, path, tmp_path, demo_models, steps=1, size=SIZE, force_demo=True, timeout=300)
    assert first["images"] and second["images"]
    assert not set(first["images"]) & set(second["images"]), "the second run reused a file name"
    assert all(p.read_bytes() == data for p, data in kept.items()), "the second run changed the first run's files"
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == len(first["images"]) + len(second["images"])
    assert names[0].startswith(f"{path.stem}_") and names[0].endswith("_00001_.png"), names
    assert names[-1].endswith("_00002_.png"), names


def test_no_shipped_workflow_uses_a_deprecated_node(object_info):
    """A node the running ComfyUI marks deprecated (shown as [DEPR] in its editor) appears in no workflow."""
    deprecated = {t for t, info in object_info.items() if info.get("deprecated")}
    assert deprecated, "the server marks no node deprecated: is the flag still called 'deprecated'?"
    used = sorted({(p.name, n["type"]) for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]
                   if n["type"] in deprecated})
    assert not used, f"deprecated nodes in shipped workflows: {used}"


def test_workflow_model_folders_exist_on_the_server(comfy_server):
    """Every folder a workflow's properties.models names is one ComfyUI has (the editor offers the download
    into it; an unknown folder shows as 'Invalid directory specified')."""
    folders = set(comfy_server.get_json("/models"))
    wanted = {(p.name, m["directory"]) for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]
              for m in (n.get("properties") or {}).get("models", [])}
    assert wanted
    assert {d for _, d in wanted} <= folders, sorted((w, d) for w, d in wanted if d not in folders)


def test_loader_sends_model_info_to_the_node(comfy_server, demo_models):
    """The loader's ui output (what js/model_info.js shows on the node) reaches the client."""
    prompt = _sd15_prompt(comfy_server, demo_models, seed=7)
    # inputs no other test sends, so the loader runs here: a node ComfyUI takes from its cache reports no ui
    # output in the history on newer versions (0.33), whatever ran before this test
    prompt[_loader_id(prompt)]["inputs"]["weight_dtype"] = "fp32"
    entry = comfy_server.run(prompt, timeout=300)
    assert execution_error(entry) is None
    info = entry["outputs"][_loader_id(prompt)]["text"]
    assert isinstance(info, list) and info and all(isinstance(t, str) and t for t in info)


def test_unknown_node_fails(comfy_server, object_info):
    wf = json.loads(WORKFLOWS[0].read_text())
    bad = copy.deepcopy(wf)
    victim = next(n for n in bad["nodes"] if n["type"] not in ("Note", "MarkdownNote"))
    victim["type"] = "NoSuchNodeFromAMissingPack"
    with pytest.raises(UnknownNodeError, match="NoSuchNodeFromAMissingPack"):
        convert(bad, object_info)
    # the server itself rejects it too when sent raw
    prompt = convert(wf, object_info)
    prompt[str(victim["id"])]["class_type"] = "NoSuchNodeFromAMissingPack"
    with pytest.raises(PromptRejected, match="'NoSuchNodeFromAMissingPack', which this ComfyUI does not know") as e:
        comfy_server.queue(prompt)
    # the node is named by the field every ComfyUI version sends ("details": "Node ID '#<id>'"); 0.3.64 names
    # the type only in its message, later versions only in extra_info.class_type
    err = e.value.data["error"]
    assert err["details"] == f"Node ID '#{victim['id']}'"
    assert e.value.node_id == str(victim["id"])
    assert prompt[e.value.node_id]["class_type"] == e.value.node_type == "NoSuchNodeFromAMissingPack"


BAD_EXPECT = {"bad-truncated.safetensors": "", "bad-corrupt.safetensors": "", "bad-empty.safetensors": "",
              "bad-vae-as-unet.safetensors": "VAE", "bad-lora-as-unet.safetensors": "LoRA",
              "bad-half-downloaded/unet/": ""}


@pytest.mark.parametrize("name", list(BAD_EXPECT))
def test_bad_input_fails_with_message_and_server_keeps_serving(comfy_server, demo_models, bad_models, name):
    assert name in bad_models[1]
    prompt = _sd15_prompt(comfy_server, demo_models, seed=random.randrange(1 << 30))
    prompt[_loader_id(prompt)]["inputs"]["unet_name"] = name
    entry = comfy_server.run(prompt, timeout=300)
    err = execution_error(entry)
    assert err is not None, f"{name} loaded without error"
    assert "DistilledUNetLoader" in err
    assert "Fix:" in err, f"message gives no fix: {err}"
    assert BAD_EXPECT[name] in err
    assert name.rstrip("/") in err, f"the message does not name the file: {err}"
    assert "Traceback" not in err
    good = comfy_server.run(_sd15_prompt(comfy_server, demo_models, seed=random.randrange(1 << 30)), timeout=300)
    assert execution_error(good) is None
    assert comfy_server.output_images(good)


def _sdxl_early_model(prompt):
    import demo_weights

    prompt[_loader_id(prompt)]["inputs"]["unet_name"] = demo_weights.SDXL_STUDENT_FILE


# bad inputs of the other nodes: workflow, edit of its API prompt, the node that must name the problem, text
OTHER_BAD = {
    "multi-unet-sdxl-early-sd15-late": ("multi_unet_sd15", _sdxl_early_model, "MultiUNetKSampler", "SDXL"),
    "multi-unet-switch-step-past-the-end": (
        "multi_unet_sd15", lambda p: _node(p, "MultiUNetKSampler")["inputs"].update(switch_step=5),
        "MultiUNetKSampler", "switch_step"),
    "lora-truncated": ("lora_on_student",
                       lambda p: _node(p, "DistilledLoraLoader")["inputs"].update(
                           lora_name="bad-truncated-lora.safetensors"),
                       "DistilledLoraLoader", "corrupt or truncated"),
    "lora-without-unet-keys": ("lora_on_student",
                               lambda p: _node(p, "DistilledLoraLoader")["inputs"].update(
                                   lora_name="bad-vae-as-lora.safetensors"),
                               "DistilledLoraLoader", "no UNet keys"),
    "build-sdxl-preset-on-an-sd15-teacher": ("build_student_sd15",
                                             lambda p: _node(p, "BuildStudentUNet")["inputs"].update(preset="vega"),
                                             "BuildStudentUNet", "for SDXL teachers"),
    "evaluate-width-not-a-multiple-of-8": ("evaluate_student_sd15",
                                           lambda p: _node(p, "EvaluateStudent")["inputs"].update(width=100),
                                           "EvaluateStudent", "multiple of 8"),
    "gri-start-after-end": ("gri_sd15_student_1024",
                            lambda p: _node(p, "GRIAttention")["inputs"].update(start_percent=0.8, end_percent=0.2),
                            "GRIAttention", "start_percent"),
}


@pytest.mark.parametrize("name", list(OTHER_BAD))
def test_other_nodes_bad_input_fails_with_message_and_server_keeps_serving(comfy_server, demo_models, bad_models,
                                                                          name):
    workflow, edit, node, text = OTHER_BAD[name]
    prompt = _sd15_prompt(comfy_server, demo_models, seed=random.randrange(1 << 30), workflow=workflow)
    edit(prompt)
    entry = comfy_server.run(prompt, timeout=300)
    err = execution_error(entry)
    assert err is not None, f"{name}: ran without error"
    assert node in err and text in err and "Fix:" in err, err
    for value in _node(prompt, node)["inputs"].values():  # a bad file is named in the message
        if isinstance(value, str) and value.startswith("bad-"):
            assert value in err, err
    assert "Traceback" not in err
    assert not comfy_server.output_images(entry)  # nothing written half-way
    good = comfy_server.run(_sd15_prompt(comfy_server, demo_models, seed=random.randrange(1 << 30),
                                         workflow=workflow), timeout=300)
    assert execution_error(good) is None
    assert comfy_server.output_images(good)


def test_soak_100_prompts(comfy_server, demo_models):
    proc = psutil.Process(comfy_server.pid)
    for seed in range(3):  # warm-up: models loaded, caches filled
        assert execution_error(comfy_server.run(_sd15_prompt(comfy_server, demo_models, seed=10_000 + seed))) is None
    rss0 = proc.memory_info().rss
    base = _sd15_prompt(comfy_server, demo_models)
    ids = []
    for seed in range(SOAK_PROMPTS):
        p = copy.deepcopy(base)
        for node in p.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["seed"] = seed
        ids.append(comfy_server.queue(p))
    entries = [comfy_server.wait(i, timeout=600) for i in ids]
    errors = [execution_error(e) for e in entries if execution_error(e)]
    assert not errors, errors[:3]
    assert all(comfy_server.output_images(e) for e in entries)
    growth_mb = (proc.memory_info().rss - rss0) / 2**20
    print(f"soak: {SOAK_PROMPTS} prompts ok, server RSS {rss0 / 2**20:.0f} MB -> "  # noqa: T201
          f"{proc.memory_info().rss / 2**20:.0f} MB (growth {growth_mb:+.1f} MB, bound {SOAK_RSS_BOUND_MB} MB)")
    assert growth_mb < SOAK_RSS_BOUND_MB
