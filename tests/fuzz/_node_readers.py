"""The readers that need ComfyUI, through the nodes' own entry points; a working load is checked by using it:

* **Load Distilled UNet** (``DistilledUNetLoader.execute``): every layout, the diffusers folder, a student saved by
  Save Student UNet's writer (recipe, block map, prediction marker), a CondConv student; working = a forward pass
  of the MODEL at 8x8;
* **Distilled LoRA Loader** (``DistilledLoraLoader.execute``): every LoRA format the pack reads, a teacher LoRA
  mapped by the block map, text-encoder keys, a pickled LoRA; working = the patched MODEL's weights differ from
  the input's, ComfyUI logged no LoRA error while patching, and a forward pass runs;
* **Load Distillation Dataset** -> Distill Student UNet's data path (``load_dataset`` then ``training_data`` with the
  teacher's own ``prepare_sample``): working = a batch of every resolution bucket;
* **resume** (the distiller's ``checkpoints.restore`` through ``Distiller.run(resume=...)``, plus ``read_history``
  as tools/distill.py reads it): working = the run resumes into its result with the student's shapes;
* **VGG16 weights** (``nodes.distill.read_vgg16``, the node's reading of models/vgg): working = features of an image;
* **CLIP vision files** (``nodes.host.judging.load_clip_vision``: tools/evaluate.py and tools/distill.py
  ``--clip-vision``): working = image embeddings of the tower's width;
* **VAE files** (``nodes.host.judging.load_vae``: tools/distill.py ``--vae``): working = a latent decoded to an image;
* **Evaluate Student's inception and reference_stats** (``nodes.evaluate.judging_files``, files under
  models/inception): working = Inception features of an image, statistics of the network's dimension.

Every reader runs its cases in a models folder of its own registered with ComfyUI's ``folder_paths`` (restored
after). ComfyUI is imported lazily: this module is collected before tests/conftest.py sets ComfyUI up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np
import torch
from distilled_unets.models.structure import names
from distilled_unets.models.structure.blockmap import derive
from hypothesis import strategies as st
from safetensors.torch import save_file

from .._lora_fixtures import FORMATS, LDM_FORMATS, lora_for
from ..layouts import write_training_dataset
from . import _mutate as M
from ._harness import Reader, by_kind, register
from ._readers import (
    CKPT_CODE,
    MINI,
    STUDENT,
    STUDENT_FIELDS,
    TEACHER,
    checkpoint_state,
    condconv_state,
    make_ckpt,
    make_diffusers_folder,
    save,
    shard_mutation,
    unet_layouts,
)

X = torch.zeros(1, 4, 8, 8)


@functools.lru_cache(maxsize=None)
def tiny(topology, seed: int = 0, prediction: str = "eps"):
    """A ModelPatcher of ``topology`` with random weights (tests/comfy/_tiny_models.py)."""
    import _tiny_models

    torch.set_num_threads(1)
    return _tiny_models.build("sd15", topology, model_channels=topology.model_channels, seed=seed,
                              prediction=prediction)


@contextlib.contextmanager
def registered(kind: str, folder: Path):
    """``folder`` as the only ComfyUI models folder of ``kind`` (restored after)."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get(kind)
    exts = saved[1] if saved else set(folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths[kind] = ([str(folder)], exts)
    folder_paths.filename_list_cache.clear()
    try:
        yield
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop(kind, None)
        else:
            folder_paths.folder_names_and_paths[kind] = saved
        folder_paths.filename_list_cache.clear()


def forward(patcher) -> torch.Tensor:
    ctx = torch.zeros(1, 8, 768)
    with torch.no_grad():
        out = patcher.model.apply_model(X, torch.tensor([1.0]), c_crossattn=ctx)
    assert tuple(out.shape) == tuple(X.shape), tuple(out.shape)
    return out


# ------------------------------------------------------------------------------------------------
# Load Distilled UNet


def make_unets(folder: Path) -> dict[str, Path]:
    from distilled_unets.nodes.host.unet import BLOCK_MAP_KEY, RECIPE_KEY, model_from_state_dict
    from distilled_unets.nodes.students import write_unet

    out = {}
    for label, topo, layout in (("ldm", MINI, "ldm"), ("gapped", STUDENT, "ldm-gapped"), ("diffusers", MINI,
                                                                                          "diffusers")):
        out[f"{label} file"] = save(unet_layouts(topo)[1][layout], folder / f"{label}.safetensors")
    out["checkpoint"] = save(checkpoint_state(STUDENT), folder / "checkpoint.safetensors")
    out["weights-only .ckpt"] = make_ckpt(folder)["ckpt"]
    out["diffusers folder"] = make_diffusers_folder(folder / "pipe")["folder"]
    out["condconv"] = save({f"model.diffusion_model.{k}": v for k, v in condconv_state(MINI).items()},
                           folder / "condconv.safetensors")
    sd = tiny(STUDENT, seed=4).model.diffusion_model.state_dict()
    recipe = {"preset": "bk-base", "teacher": "teacher.safetensors", "family": "sd1", "made_by": "fuzz",
              "distilled": [{"steps": 2, "heldout_before": 0.5, "heldout_after": 0.4}]}
    for pred in ("eps", "v_prediction"):
        model = model_from_state_dict(STUDENT, dict(sd), prediction=pred, attachments={
            BLOCK_MAP_KEY: derive(TEACHER, STUDENT, built=True), RECIPE_KEY: recipe})
        written = write_unet(model, str(folder), lambda n, p=pred: f"student-{p}.safetensors", "fp16", "a student")
        out[f"saved student ({pred})"] = Path(written)
    return out


def load_unet(path: Path):
    from distilled_unets.nodes.loaders import DistilledUNetLoader

    name = path.name + ("/" if path.is_dir() else "")
    return DistilledUNetLoader.execute(unet_name=name, weight_dtype="default", prediction="auto").args


def unet_works(result) -> None:
    patcher, text = result[0], result[1]
    assert "File layout" in text
    forward(patcher)


def _unet_mutation(draw, data: bytes):
    if draw(st.integers(0, 9), label="metadata or file") < 2:
        return M.metadata(draw, data, STUDENT_FIELDS)
    return M.safetensors_file(STUDENT_FIELDS)(draw, data)


register(Reader("Load Distilled UNet (node)", make_unets, load_unet, unet_works,
                by_kind(safetensors=_unet_mutation, torch_=M.torch_file(CKPT_CODE)),
                names=(("DistilledUNetLoader", "unet_name"),), host=True,
                setup=lambda workdir: registered("diffusion_models", workdir)))


# ------------------------------------------------------------------------------------------------
# Distilled LoRA Loader


def _module_shapes(patcher, layout: str) -> dict:
    from distilled_unets.nodes.host.unet import topology_of

    sd = patcher.model.state_dict()
    return {(ld if layout == "ldm" else d): tuple(sd[f"diffusion_model.{ld}.weight"].shape)
            for d, ld in names.module_map(topology_of(patcher)).items()}


def make_loras(folder: Path) -> dict[str, Path]:
    student, teacher = tiny(STUDENT, seed=1), tiny(TEACHER, seed=2)
    out = {}
    for fmt in FORMATS:
        layout = "ldm" if fmt in LDM_FORMATS else "diffusers"
        tensors, meta, _, _ = lora_for(_module_shapes(student, layout), fmt, seed=3)
        out[fmt] = save(tensors, folder / f"{fmt}.safetensors", meta or None)
    tensors, _, _, _ = lora_for(_module_shapes(teacher, "diffusers"), "kohya", seed=4)
    out["teacher kohya"] = save(tensors, folder / "teacher.safetensors")
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors, _, _, _ = lora_for(_module_shapes(student, "diffusers"), "kohya", seed=5)
    tensors.update({f"{te}.lora_down.weight": torch.randn(2, 768), f"{te}.lora_up.weight": torch.randn(768, 2),
                    f"{te}.alpha": torch.tensor(2.0)})
    out["with text encoder"] = save(tensors, folder / "with-te.safetensors")
    torch.save(tensors, str(folder / "pickled.pt"))
    out["pickled"] = folder / "pickled.pt"
    return out


def load_lora(path: Path):
    from distilled_unets.nodes.lora import DistilledLoraLoader

    return DistilledLoraLoader.execute(model=tiny(STUDENT, seed=1), lora_name=path.name, strength_model=1.0,
                                       strength_clip=1.0).args


class _Errors(logging.Handler):
    """ComfyUI logs a LoRA it cannot apply ('ERROR lora ...', 'WARNING SHAPE MISMATCH ...') instead of raising."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "ERROR" in msg or "SHAPE MISMATCH" in msg or "lora" in msg.lower():
            self.lines.append(msg)


@functools.lru_cache(maxsize=None)
def _base_weights() -> dict:
    return {k: v.clone() for k, v in tiny(STUDENT, seed=1).model.state_dict().items()}


def lora_works(result) -> None:
    model, _, report = result
    base, before = tiny(STUDENT, seed=1), _base_weights()
    handler = _Errors()
    logging.getLogger().addHandler(handler)
    try:
        model.patch_model()
        changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
        forward(model)
    finally:
        model.unpatch_model()  # also after a patch that failed half-way: the base MODEL is shared by the cases
        logging.getLogger().removeHandler(handler)
    assert not handler.lines, f"ComfyUI could not apply the LoRA: {handler.lines[:3]}"
    assert changed, f"no weight changed: {report}"
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items()), "the input MODEL changed"


LORA_FIELDS = ("lora_adapter_metadata", "ss_network_alpha", "ss_network_dim", "format")
register(Reader("Distilled LoRA Loader (node)", make_loras, load_lora, lora_works,
                by_kind(safetensors=M.safetensors_file(LORA_FIELDS),
                        torch_=M.torch_file({"lora_unet_x.lora_up.weight": M.RunsCode()})),
                names=(("DistilledLoraLoader", "lora_name"),), host=True,
                setup=lambda workdir: registered("loras", workdir), refused=("pickled",), ci_cases=150))


# ------------------------------------------------------------------------------------------------
# Load Distillation Dataset -> Distill Student UNet's data


def make_datasets(folder: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for label, sizes in (("one size", [(8, 8)] * 5), ("two sizes", [(8, 8)] * 3 + [(8, 12)] * 2)):
        lat = [{"samples": torch.randn(1, 4, h, w, generator=g)} for h, w in sizes]
        cond = [[[torch.randn(1, 8 if i % 2 else 5, 768, generator=g), {}]] for i in range(len(sizes))]
        write_training_dataset(folder / label.replace(" ", "-"), lat, cond, shard_size=2)
        out[label] = folder / label.replace(" ", "-")
    return out


def open_dataset(path: Path):
    from distilled_unets.nodes.datasets import load_dataset
    from distilled_unets.nodes.distill import training_data

    src, held, _ = training_data(tiny(MINI), None, None, load_dataset(path.name))  # the loader's default split
    return src, held


def dataset_works(sides) -> None:
    src, held = sides
    for side in (src, held) if held is not None else (src,):
        for shape, idx in side.buckets():
            x0, ctx, y = side.batch(torch.tensor(idx))
            assert tuple(x0.shape) == (len(idx), *shape) and ctx.shape[0] == len(idx) and ctx.shape[-1] == 768


register(Reader("Load Distillation Dataset -> Distill Student UNet data", make_datasets, open_dataset, dataset_works,
                by_kind(torch_=shard_mutation),
                names=(("LoadDistillationDataset", "folder_name"), ("DistillStudentUNet", "data")), host=True,
                setup=lambda workdir: registered("datasets", workdir)))


# ------------------------------------------------------------------------------------------------
# the distiller's checkpoints, given to resume

NODE = "DistillStudentUNet"
RUN = dict(steps=2, batch_size=2, ema_decay=0.9, learning_rate=1e-3, seed=3)


def _distiller(**cfg):
    from distilled_unets.models.students import distill as D
    from distilled_unets.nodes.host.unet import topology_of

    teacher, student = tiny(STUDENT, seed=2), tiny(MINI, seed=1)  # the smallest pair: a copy per case
    g = torch.Generator().manual_seed(0)
    data = D.KDData(torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 8, 768, generator=g) * 0.5)
    return D.Distiller(teacher=teacher.model.diffusion_model, student=student.model.diffusion_model,
                       teacher_topology=topology_of(teacher), student_topology=topology_of(student),
                       schedule=D.NoiseSchedule(teacher.model.model_sampling, prediction="eps"), data=data,
                       heldout=None, config=D.DistillConfig(**dict(RUN, **cfg)), device="cpu", node=NODE)


def make_checkpoints(folder: Path) -> dict[str, Path]:
    res = _distiller(checkpoint_every=2, checkpoint_dir=str(folder)).run()
    return {"checkpoint": Path(res.checkpoints[-1])}


def resume(path: Path):
    from distilled_unets.models.students.distill.checkpoints import read_evaluations, read_history

    res = _distiller().run(resume=str(path))
    # as tools/distill.py reads them for losses.csv and eval.csv
    return res, read_history(str(path))[0], read_evaluations(str(path))


def resume_works(result) -> None:
    res, losses, _ = result
    student = tiny(MINI, seed=1).model.diffusion_model.state_dict()
    assert res.resumed_from == res.steps_done == RUN["steps"] and len(losses) == RUN["steps"]
    assert {k: tuple(v.shape) for k, v in res.state_dict.items()} == {k: tuple(v.shape) for k, v in student.items()}


register(Reader("distillation checkpoint given to resume", make_checkpoints, resume, resume_works,
                by_kind(safetensors=M.safetensors_file(("format", "version", "step", "optimizer_steps", "ema_updates",
                                                        "config", "data", "global_batch", "skipped_steps",
                                                        "heldout_before", "scaler", "trainable"))),
                names=((NODE, "resume_from"), (NODE, "steps")), host=True, ci_cases=100))


# ------------------------------------------------------------------------------------------------
# VGG16 weights (models/vgg)


def make_vgg(folder: Path) -> dict[str, Path]:
    from distilled_unets.models.students.distill.vgg import VGG16_CONVS

    g = torch.Generator().manual_seed(9)
    sd = {}
    for i, cin, cout in VGG16_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    sd["classifier.6.bias"] = torch.zeros(10)
    save_file({k: v.half() for k, v in sd.items()}, str(folder / "vgg16.safetensors"))
    torch.save(sd, str(folder / "vgg16.pth"))
    return {"safetensors": folder / "vgg16.safetensors", "pth": folder / "vgg16.pth"}


def read_vgg(path: Path):
    from distilled_unets.nodes.distill import read_vgg16

    return read_vgg16(path.name)[0]


def vgg_works(vgg) -> None:
    feats = vgg(torch.randn(1, 3, 16, 16))
    assert [tuple(f.shape[1:2]) for f in feats] == [(64,), (128,), (256,)]


register(Reader("VGG16 weights (models/vgg)", make_vgg, read_vgg, vgg_works,
                by_kind(torch_=M.torch_file({"features.0.weight": M.RunsCode()})),
                names=((NODE, "vgg16"),), host=True, setup=lambda workdir: registered("vgg", workdir)))


# ------------------------------------------------------------------------------------------------
# CLIP vision files (tools/evaluate.py and tools/distill.py --clip-vision)


@contextlib.contextmanager
def tiny_tower_known(workdir: Path):
    """The config of tests/comfy/_tiny_models.clip_vision's tower (ComfyUI's ClipVisionModel at width 64) as one
    more of the CLIP vision configs the loader knows (ComfyUI ships full-size ones only): the mutated files are
    tiny towers, checked by the same code as a ViT-L/14."""
    import _tiny_models
    from distilled_unets.nodes.host import judging as J

    _tiny_models.clip_vision(workdir)  # writes workdir/cv.json
    cfg = str(workdir / "cv.json")
    J.CLIP_VISION_CONFIGS.append(cfg)
    try:
        yield
    finally:
        J.CLIP_VISION_CONFIGS.remove(cfg)


def to_open_clip(sd: dict) -> dict:
    """A tower in ComfyUI's (transformers') names -> the OpenAI / open_clip layout (``visual.*``, q/k/v in one
    ``in_proj``), which ComfyUI's loader converts back."""
    top = {"vision_model.embeddings.class_embedding": "class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "positional_embedding",
           "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
           "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {f"visual.{v}": sd[k] for k, v in top.items()}
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    for i in range(layers):
        a, b = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for x, y in block.items():
            for w in ("weight", "bias"):
                out[f"{b}{y}.{w}"] = sd[f"{a}{x}.{w}"]
        for w in ("weight", "bias"):
            out[f"{b}attn.in_proj_{w}"] = torch.cat([sd[f"{a}self_attn.{q}_proj.{w}"] for q in "qkv"])
    return out


def tiny_clip_vision(folder: Path) -> dict:
    """The tensors of tests/comfy/_tiny_models.clip_vision's tower (its config written into ``folder``)."""
    import _tiny_models

    return {k: v.detach().contiguous() for k, v in _tiny_models.clip_vision(folder, seed=3).model.state_dict().items()}


def make_clip_visions(folder: Path) -> dict[str, Path]:
    from distilled_unets.nodes.host import judging as J

    sd = tiny_clip_vision(folder)
    out = {"tiny tower": save(sd, folder / "tiny-clip-vision.safetensors"),
           "tiny tower, OpenAI layout": save(to_open_clip(sd), folder / "tiny-openai.safetensors")}
    torch.save(sd, str(folder / "tiny-clip-vision.pt"))
    out["tiny tower .pt"] = folder / "tiny-clip-vision.pt"
    for tower, layer in (("ViT-L/14", 22), ("ViT-bigG/14", 47)):  # ComfyUI would build these at full size
        lie = dict(sd, **{f"vision_model.encoder.layers.{layer}.layer_norm1.weight": torch.ones(64)})
        out[f"tiny tensors named as {tower}"] = save(lie, folder / f"claims-{tower[4:-3]}.safetensors")
    vitl = next(p for p in J.clip_vision_configs() if p.endswith("clip_vision_config_vitl.json"))
    out["ViT-L/14 (full size)"] = M.sparse_safetensors(folder / "clip-vit-large-patch14.safetensors",
                                                        dict(J.clip_vision_model(vitl)[1]))
    return out


def clip_vision_works(cv) -> None:
    from distilled_unets.nodes.host import judging as J

    width = cv.model.visual_projection.weight.shape[0]
    emb = J.image_embeddings(cv, torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8))
    assert tuple(emb.shape) == (1, width), tuple(emb.shape)


def load_clip_vision(path: Path):
    from distilled_unets.nodes.host import judging as J

    return J.load_clip_vision(str(path))


register(Reader("CLIP vision file (--clip-vision)", make_clip_visions, load_clip_vision, clip_vision_works,
                by_kind(torch_=M.torch_file({"visual_projection.weight": M.RunsCode()})),
                names=((None, "--clip-vision"),), host=True, setup=tiny_tower_known,
                refused=("tiny tensors named as ViT-L/14", "tiny tensors named as ViT-bigG/14"),
                check_only=("ViT-L/14 (full size)",), ci_cases=60))


# ------------------------------------------------------------------------------------------------
# VAE files (tools/distill.py --vae)


def make_vaes(folder: Path) -> dict[str, Path]:
    import demo_weights
    from distilled_unets.nodes.host import judging as J

    taesd = demo_weights.taesd("", seed=4)
    out = {"TAESD": save(taesd, folder / "taesd.safetensors")}
    torch.save(taesd, str(folder / "taesd.pt"))
    out["TAESD .pt"] = folder / "taesd.pt"
    ck = {f"model.diffusion_model.{k}": v for k, v in unet_layouts(MINI)[1]["ldm"].items()}
    ck.update({f"first_stage_model.{k}": v.half() for k, v in taesd.items()})
    ck["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(
        16, 8, dtype=torch.float16)
    out["checkpoint with a TAESD"] = save(ck, folder / "checkpoint.safetensors")
    # the SD 1.x / 2.x / SDXL VAE at full size (84 M parameters; zeros, written sparse), in ComfyUI's names and in
    # diffusers' (vae/diffusion_pytorch_model.safetensors)
    out["SD VAE (fp16)"] = M.sparse_safetensors(folder / "vae-ft-mse.safetensors", dict(J.vae_shapes("kl")))
    out["SD VAE, diffusers layout"] = M.sparse_safetensors(folder / "diffusion_pytorch_model.safetensors",
                                                           diffusers_vae_shapes())
    return out


def diffusers_vae_shapes() -> dict:
    """{name: shape} of the SD VAE in diffusers' names, from diffusers' own ``AutoencoderKL`` of the SD
    configuration (on the meta device)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def vae_works(vae) -> None:
    img = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert tuple(img.shape) == (1, 64, 64, 3), tuple(img.shape)


def load_vae(path: Path):
    from distilled_unets.nodes.host import judging as J

    return J.load_vae(str(path))


register(Reader("VAE file (tools/distill.py --vae)", make_vaes, load_vae, vae_works,
                by_kind(torch_=M.torch_file({"taesd_decoder.1.weight": M.RunsCode()})),
                names=((None, "--vae"),), host=True, check_only=("SD VAE, diffusers layout",), ci_cases=40))


# ------------------------------------------------------------------------------------------------
# Evaluate Student's inception and reference_stats (files under models/inception)

EVAL_NODE = "EvaluateStudent"
PRISTINE_INCEPTION = "pristine-inception.safetensors"


def make_judging_files(folder: Path) -> dict[str, Path]:
    from ._readers import inception_state

    # the .pth is fuzzed by the host-free reader; here the node's path: names under models/inception
    out = {"inception (.safetensors)": save({k: v.half() if v.is_floating_point() else v
                                             for k, v in inception_state().items()}, folder / "inception.safetensors")}
    g = np.random.default_rng(1)
    np.savez(folder / "fid_stats_coco.npz", mu=g.standard_normal(2048), sigma=np.eye(2048))
    out["reference statistics (2048-d)"] = folder / "fid_stats_coco.npz"
    return out


@contextlib.contextmanager
def inception_folder(workdir: Path):
    """``workdir`` as models/inception, holding an unbroken network next to the cases (for the statistics)."""
    import distilled_unets.nodes.evaluate  # noqa: F401  (registers models/inception, .npz included)

    from ._readers import inception_state

    save({k: v.half() if v.is_floating_point() else v for k, v in inception_state().items()},
         workdir / PRISTINE_INCEPTION)
    with registered("inception", workdir):
        yield


def judging_files_of(path: Path):
    from distilled_unets.nodes.evaluate import judging_files

    if path.suffix == ".npz":
        return judging_files(PRISTINE_INCEPTION, path.name)
    return judging_files(path.name, "none")


def judging_files_work(result) -> None:
    from ._readers import inception_works

    net, stats, _, _ = result
    assert net is not None
    inception_works(net)
    if stats is not None:
        mu, sigma = stats
        assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(sigma).all()


register(Reader("Evaluate Student inception and reference_stats (node)", make_judging_files, judging_files_of,
                judging_files_work, by_kind(torch_=M.torch_file({"Conv2d_1a_3x3.conv.weight": M.RunsCode()})),
                names=((EVAL_NODE, "inception"), (EVAL_NODE, "reference_stats")), host=True, setup=inception_folder,
                ci_cases=10))
