"""The host-free readers under fuzzing: what the loader decides without ComfyUI (every UNet layout, the diffusers
folder, a saved student's metadata, CondConv files), one Save Training Dataset shard, and the evaluation's files
(the FID Inception network, pytorch-fid reference statistics, a prompt file).

Valid inputs are tiny random UNets in the real layouts (``tests/layouts.py``: diffusers' own
``UNet2DConditionModel`` state dict, renamed to ldm and to the converter's gapped numbering), written once per
session in fp16. The node-level readers (a forward pass through ComfyUI's UNet, LoRA patching, dataset batches,
resume, VGG) are in ``_node_readers.py``.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from distilled_unets.models.files.loader import (
    META_BLOCK_MAP,
    META_PREDICTION,
    META_RECIPE,
    block_map_of,
    info,
    prediction_hint,
    read_unet,
    recipe_of,
)
from distilled_unets.models.structure.blockmap import derive
from distilled_unets.models.structure.topology import Topology, diffusers_config
from distilled_unets.models.students.distill.datasets import load_shard
from distilled_unets.models.students.evaluate.inception import load_inception, read_reference_stats
from distilled_unets.models.students.evaluate.plan import MAX_PROMPT_CHARS, MAX_PROMPT_FILE, read_prompt_file
from hypothesis import strategies as st
from safetensors.torch import save_file

from ..layouts import diffusers_model, layouts, write_training_dataset
from . import _mutate as M
from ._harness import Reader, by_kind, register

#: tiny SD1-family structures (ComfyUI's GroupNorm needs 32 channels): two levels, no middle block; and a
#: BK-SDM-Base-like student of a two-resnet teacher, with a middle block
MINI = Topology("sd1", 32, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), -2, 768, False)
TEACHER = Topology("sd1", 32, (1, 2), (2, 2), (1, 1, 1, 1), (1, 1, 1, 1, 1, 1), 1, 768, False)
STUDENT = Topology("sd1", 32, (1, 2), (1, 1), (1, 1), (1, 1, 1, 1), 1, 768, False)
CONDCONV_PATHS = ("input_blocks.1.0.in_layers.2", "output_blocks.1.0.out_layers.3")
STUDENT_FIELDS = (META_RECIPE, META_BLOCK_MAP, META_PREDICTION, "modelspec.prediction_type", "modelspec.predict_key",
                  "modelspec.title")


@functools.lru_cache(maxsize=None)
def unet_layouts(topology: Topology, seed: int = 0) -> tuple[dict, dict]:
    """(diffusers config, {layout: fp16 state dict}) of a random UNet of ``topology``."""
    cfg = diffusers_config(topology)
    m = diffusers_model(cfg, seed=seed)
    sd = {k: v.detach().half().contiguous() for k, v in m.state_dict().items()}
    return cfg, layouts(sd, cfg)


def save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def checkpoint_state(topology: Topology) -> dict:
    """A full-checkpoint state dict: the UNet under ``model.diffusion_model.`` next to VAE / text-encoder tensors."""
    _, files = unet_layouts(topology)
    sd = {f"model.diffusion_model.{k}": v for k, v in files["ldm"].items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3, dtype=torch.float16)
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(
        16, 8, dtype=torch.float16)
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 16)
    return sd


def condconv_state(topology: Topology, experts: int = 2) -> dict:
    """An ldm state dict with A-SDM CondConv layers in place of :data:`CONDCONV_PATHS` (the pack's own module)."""
    from distilled_unets.models.patches.condconv import CondConv2d

    _, files = unet_layouts(topology)
    sd = dict(files["ldm"])
    g = torch.Generator().manual_seed(5)
    for path in CONDCONV_PATHS:
        w, b = sd.pop(f"{path}.weight").float(), sd.pop(f"{path}.bias").float()
        cc = CondConv2d.from_conv(w, b, num_experts=experts, generator=g, padding=1)
        with torch.no_grad():
            cc.routing_weight.normal_(0, 0.1, generator=g)
        for k, v in cc.state_dict().items():
            sd[f"{path}.{k}"] = v.detach().half()
    return sd


def student_metadata(prediction: str = "eps") -> dict:
    """What Save Student UNet writes for a student built here (nodes/students.save_metadata's keys)."""
    bm = derive(TEACHER, STUDENT, built=True)
    recipe = {"preset": "bk-base", "teacher": "teacher.safetensors", "family": "sd1", "teacher_sha256": "ab" * 32,
              "source": "BK-SDM", "made_by": "distilled-unets fuzz",
              "distilled": [{"steps": 4, "samples_seen": 8, "train": "all", "loss_weights": "bk-sdm",
                             "heldout_before": 0.5, "heldout_after": 0.25}]}
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm", "modelspec.title": "student",
            "modelspec.predict_key": "v" if prediction == "v_prediction" else "epsilon", META_PREDICTION: prediction,
            META_RECIPE: json.dumps(recipe), META_BLOCK_MAP: bm.to_json()}


# ------------------------------------------------------------------------------------------------
# valid inputs


def unet_file(layout: str, prefix: str = ""):
    def make(folder: Path) -> dict[str, Path]:
        out = {}
        for label, topo in (("mini", MINI), ("with-mid", STUDENT)):
            _, files = unet_layouts(topo)
            out[label] = save({prefix + k: v for k, v in files[layout].items()}, folder / f"{label}.safetensors")
        return out
    return make


def make_checkpoint(folder: Path) -> dict[str, Path]:
    return {"checkpoint": save(checkpoint_state(STUDENT), folder / "checkpoint.safetensors")}


def make_ckpt(folder: Path) -> dict[str, Path]:
    path = folder / "unet.ckpt"
    torch.save({"state_dict": checkpoint_state(MINI), "global_step": 7}, str(path))
    return {"ckpt": path}


def make_diffusers_folder(folder: Path) -> dict[str, Path]:
    cfg, files = unet_layouts(MINI)
    single = folder / "single" / "unet"
    save(files["diffusers"], single / "diffusion_pytorch_model.safetensors")
    (single / "config.json").write_text(json.dumps(cfg))
    sharded = folder / "sharded" / "unet"
    keys = sorted(files["diffusers"])
    half = len(keys) // 2
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        save({k: files["diffusers"][k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(cfg))
    sched = folder / "sharded" / "scheduler"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon",
                                                             "num_train_timesteps": 1000}))
    return {"folder": single, "sharded folder": sharded}


def make_student(folder: Path) -> dict[str, Path]:
    _, files = unet_layouts(STUDENT)
    ldm = {f"model.diffusion_model.{k}": v for k, v in files["ldm"].items()}
    v = dict(ldm, v_pred=torch.tensor([]))
    return {"eps": save(ldm, folder / "student.safetensors", student_metadata()),
            "v-prediction": save(v, folder / "student-v.safetensors", student_metadata("v_prediction"))}


def make_condconv(folder: Path) -> dict[str, Path]:
    sd = {f"model.diffusion_model.{k}": v for k, v in condconv_state(MINI).items()}
    return {"condconv": save(sd, folder / "condconv.safetensors")}


def make_shards(folder: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(3)
    lat = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(3)]
    cond = [[[torch.randn(1, 8, 768, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
            for _ in range(3)]
    write_training_dataset(folder / "set", lat, cond, shard_size=3)
    shard = folder / "shard_0000.pkl"
    shutil.copyfile(folder / "set" / "shard_0000.pkl", shard)
    return {"shard": shard}


# ------------------------------------------------------------------------------------------------
# the calls under test


def loader_view(path: Path):
    """Everything the loader nodes read from a UNet before ComfyUI builds it: the checked, detected file, the
    prediction type, the info text (recipe and block map included)."""
    f = read_unet(str(path))
    pred, zsnr, why = prediction_hint(f)
    text, _ = info(f, pred or "eps", why or "default")
    return f, text, recipe_of(f.metadata), block_map_of(f.metadata, f.topology)


def detected_unet(result) -> None:
    f, text, recipe, bm = result
    assert f.topology.levels >= 1 and f.detection.key_map, "no UNet detected"
    assert f.params > 0 and text.strip()
    assert all(len(s) == len(f.shapes[k]) for k, s in f.shapes.items())


def shard_lists(result) -> None:
    latents, conditioning = result
    assert isinstance(latents, list) and isinstance(conditioning, list) and len(latents) == len(conditioning)


# ------------------------------------------------------------------------------------------------
# student metadata: mostly metadata edits, and every safetensors mutation


def _student_mutation(draw, data: bytes):
    if draw(st.integers(0, 9), label="metadata or file") < 7:
        return M.metadata(draw, data, STUDENT_FIELDS)
    return M.safetensors_file(STUDENT_FIELDS)(draw, data)


def _shard_structure(draw, data: bytes):
    """A Save Training Dataset shard of the wrong structure (a valid torch.save file)."""
    import io

    d = torch.load(io.BytesIO(data), weights_only=True)
    lat, cond = d["latents"], d["conditioning"]
    i = draw(st.integers(0, len(lat) - 1), label="sample")
    what = draw(st.sampled_from(["latents-type", "latent", "cond", "lengths", "root", "extra-key"]),
                label="structure")
    if what == "latents-type":
        d[draw(st.sampled_from(["latents", "conditioning"]))] = draw(st.sampled_from(
            [None, 3, "x", {"samples": torch.zeros(1)}, (1, 2), torch.zeros(3, 4)]), label="value")
    elif what == "latent":
        lat[i] = draw(st.sampled_from([
            None, 5, "samples", {"samples": None}, {"samples": [1.0, 2.0]}, {"other": torch.zeros(1, 4, 8, 8)},
            {"samples": torch.zeros(2, 4, 8, 8)}, {"samples": torch.zeros(4)}, {"samples": torch.zeros(1, 4, 0, 8)},
            {"samples": torch.zeros(1, 1, 1, 4, 8, 8)}, {"samples": torch.zeros(1, 4, 8, 8, dtype=torch.int32)},
            {"samples": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, {"samples": torch.full((1, 4, 8, 8), float("nan"))},
            {"samples": torch.zeros(1, 9, 8, 8)}, {"samples": torch.zeros(1, 4, 6, 10)}, torch.zeros(4, 8, 8)]),
            label="latent")
    elif what == "cond":
        c = cond[i][0][0]
        cond[i] = draw(st.sampled_from([
            None, [], [[]], [[c]], [[c, None]], [[c, {}], [c, {}]], [[None, {}]], [["text", {}]],
            [[c[0], {}]], [[c[..., :5], {}]], [[torch.zeros(1, 0, 768), {}]], [[c.to(torch.int64), {}]],
            [[c.unsqueeze(0), {}]], [[c, {"pooled_output": "x"}]], [[c, {"pooled_output": torch.zeros(3)}]],
            [c, {}], c]), label="conditioning")
    elif what == "lengths":
        d["latents"] = lat[:-1]
    elif what == "root":
        d = draw(st.sampled_from([[lat, cond], {"latents": lat}, {}, None, 7, "shard", torch.zeros(2)]), label="root")
    else:
        d["extra"] = draw(st.sampled_from([None, 1, torch.zeros(2), {"a": [1, 2]}]), label="extra")
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue(), f"shard structure: {what}"


def shard_mutation(draw, data: bytes):
    if draw(st.booleans(), label="structure or bytes"):
        return _shard_structure(draw, data)
    return M.torch_file({"latents": [{"samples": M.RunsCode()}], "conditioning": [[]]})(draw, data)


CKPT_CODE = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": M.RunsCode()}}

UNET_LAYOUTS = {
    "unet file, diffusers layout": unet_file("diffusers"),
    "unet file, ldm layout": unet_file("ldm"),
    "unet file, gapped ldm layout": unet_file("ldm-gapped"),
}
for _name, _make in UNET_LAYOUTS.items():
    register(Reader(_name, _make, loader_view, detected_unet, by_kind()))
register(Reader("full checkpoint (prefixed, with VAE and text encoder)", make_checkpoint, loader_view, detected_unet,
                by_kind()))
register(Reader("weights-only .ckpt", make_ckpt, loader_view, detected_unet, by_kind(torch_=M.torch_file(CKPT_CODE))))
register(Reader("diffusers unet/ folder with config.json", make_diffusers_folder, loader_view, detected_unet,
                by_kind()))
register(Reader("saved student metadata (recipe, block map, prediction)", make_student, loader_view, detected_unet,
                by_kind(safetensors=_student_mutation)))
register(Reader("CondConv UNet file", make_condconv, loader_view, detected_unet, by_kind()))
register(Reader("Save Training Dataset shard", make_shards, lambda p: load_shard(str(p)), shard_lists,
                by_kind(torch_=shard_mutation)))


# ------------------------------------------------------------------------------------------------
# the evaluation's files: the FID Inception network, reference statistics, a prompt file


@functools.lru_cache(maxsize=1)
def inception_state() -> dict:
    """A random FID Inception in pytorch-fid's layout (torchvision's Inception3 names, 1008 classes, no aux
    logits): the tensors of ``pt_inception-2015-12-05-6726825d.pth``, seeded."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def make_inception(folder: Path) -> dict[str, Path]:
    sd = inception_state()
    torch.save(sd, str(folder / "pt_inception-2015-12-05-6726825d.pth"))  # as pytorch-fid ships it: fp32
    save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, folder / "inception.safetensors")
    return {"pytorch-fid .pth": folder / "pt_inception-2015-12-05-6726825d.pth",
            "safetensors copy (fp16)": folder / "inception.safetensors"}


def inception_works(net) -> None:
    pool, logits = net(torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8))
    assert tuple(pool.shape) == (1, 2048) and tuple(logits.shape) == (1, 1008), (pool.shape, logits.shape)


STATS_DIM = 64  # the reader's dimension check is a parameter: 64-d statistics keep each case cheap


def make_stats(folder: Path) -> dict[str, Path]:
    g = np.random.default_rng(0)
    x = g.standard_normal((200, STATS_DIM))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    np.savez(folder / "fid_stats.npz", mu=mu, sigma=sigma)  # as pytorch-fid --save-stats writes it
    np.savez_compressed(folder / "fid_stats_f32.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    return {"pytorch-fid (float64)": folder / "fid_stats.npz", "compressed float32": folder / "fid_stats_f32.npz"}


def stats_work(stats) -> None:
    mu, sigma = stats
    assert mu.shape == (STATS_DIM,) and sigma.shape == (STATS_DIM, STATS_DIM) and mu.dtype == sigma.dtype == np.float64
    assert np.isfinite(mu).all() and np.isfinite(sigma).all()


def make_prompts(folder: Path) -> dict[str, Path]:
    (folder / "prompts.txt").write_text("a red cube on a table\n\na blue sphere, studio lighting\nportrait of an old "
                                        "fisherman, 85 mm\n", encoding="utf-8")
    (folder / "captions.txt").write_bytes("\ufeffcaf\u00e9 terrace at night\r\n  \u6f22\u5b57 sign  \r\n".encode())
    return {"prompts": folder / "prompts.txt", "captions (BOM, CRLF)": folder / "captions.txt"}


def prompts_work(prompts) -> None:
    assert isinstance(prompts, list) and prompts
    for p in prompts:
        assert isinstance(p, str) and p and p == p.strip() and "\x00" not in p and len(p) <= MAX_PROMPT_CHARS, p[:80]


def prompt_mutation(draw, src: Path, case: Path) -> str:
    """The text mutations, and now and then a file over the size limit (sparse: nothing is written)."""
    if draw(st.integers(0, 24), label="over the size limit") == 0:
        shutil.copyfile(src, case)
        with open(case, "r+b") as f:
            f.truncate(MAX_PROMPT_FILE + 1)
        return "text: larger than the limit"
    return by_kind()(draw, src, case)


register(Reader("FID Inception network (.pth, .safetensors)", make_inception, lambda p: load_inception(str(p)),
                inception_works, by_kind(torch_=M.torch_file({"Conv2d_1a_3x3.conv.weight": M.RunsCode()})),
                ci_cases=12))
register(Reader("reference statistics (.npz)", make_stats, lambda p: read_reference_stats(str(p), dim=STATS_DIM),
                stats_work, by_kind(), ci_cases=200))
register(Reader("prompt file (tools/evaluate.py --prompts)", make_prompts, lambda p: read_prompt_file(str(p)),
                prompts_work, prompt_mutation, ci_cases=200))
