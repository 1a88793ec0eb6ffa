"""Write TINY random-weight models in the real on-disk layouts, for demos and tests.

Images made with these weights are NOISE: every tensor is random (fixed seed), nothing was trained.
They exist so that the example workflows run end to end on a machine without downloaded models.

Written under ``<models dir>`` (laid out like ``ComfyUI/models``):

* ``diffusion_models/demo-tiny-sd/unet/`` - a diffusers ``unet/`` folder (config.json +
  diffusion_pytorch_model.safetensors) of a tiny-sd-shaped student: 3 stages, one resnet per
  stage, no middle block, widths 32/64/128, cross-attention 768.
* ``diffusion_models/demo-tiny-sd.safetensors`` - the same student as one diffusers-layout file.
* ``checkpoints/demo-sd15.safetensors`` - an SD1.5-layout full checkpoint that ComfyUI's
  CheckpointLoaderSimple detects as SD1.5: a one-level UNet of width 320 (ComfyUI only matches
  ``model_channels == 320``) under ``model.diffusion_model.``, a full-size random CLIP-L under
  ``cond_stage_model.transformer.`` (ComfyUI's SD1 text-encoder config is fixed at 12 x 768) and,
  as the VAE under ``first_stage_model.``, a TAESD-layout tiny autoencoder (ComfyUI builds TAESD
  when it sees ``taesd_decoder.*``; its SD VAE config is fixed at 83 M parameters).
* ``loras/demo-sd15-lora.safetensors`` - a kohya-format LoRA (rank 4) on the demo student's
  attention projections and on CLIP-L.
* ``vae/demo-vae.safetensors`` - a small diffusers-layout AutoencoderKL (for bad-input tests: a VAE
  given as a UNet).
* with ``sdxl=True``: ``diffusion_models/demo-koala-tiny.safetensors`` (a tiny KOALA-shaped SDXL
  student, diffusers layout) and ``checkpoints/demo-sdxl.safetensors``, an SDXL-family checkpoint
  ComfyUI detects as KOALA-700M (width 320, transformer depths 0/2/5), with full-size random
  CLIP-L and OpenCLIP-bigG (ComfyUI's configs are fixed; bigG is 695 M parameters, about 1.4 GB in
  fp16) and a TAESD-layout VAE.
* with ``teacher=True``: ``checkpoints/demo-sd15-teacher.safetensors``, an SD1.5 checkpoint with the FULL
  SD1.5 UNet structure (860 M random fp16 parameters, 1.7 GB): the teacher the student workflows build
  and distil from (block removal needs every block of the real UNet).

``python tools/demo_weights.py DIR [--sdxl] [--teacher]``. Re-running is cheap: files already written by the
same version are kept (``DEMO_WEIGHTS.json`` records what is there), so they are written once per machine into
one cache, ``~/.cache/distilled_unets/demo-models`` (``tools/run_workflow.py``'s ``--demo-dir`` default, also used
by the server tests; never a ComfyUI folder): 0.3 GB, 4 GB with ``--sdxl --teacher``. Concurrent writers (two
test runs) take turns on a lock file there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import time
from pathlib import Path

import torch
from _host import import_pack
from safetensors.torch import save_file

log = logging.getLogger("distilled_unets.tools")

VERSION = 1
STAMP = "DEMO_WEIGHTS.json"
NOISE_NOTE = "random weights: images made with them are noise"

STUDENT_FOLDER = "demo-tiny-sd/unet/"
STUDENT_FILE = "demo-tiny-sd.safetensors"
SDXL_STUDENT_FILE = "demo-koala-tiny.safetensors"
SD15_CKPT = "demo-sd15.safetensors"
SDXL_CKPT = "demo-sdxl.safetensors"
#: a full-structure SD1.5 checkpoint (the teacher for BuildStudentUNet / DistillStudentUNet: block removal needs
#: every block of the real UNet; ComfyUI detects SD1.5 only at width 320): 860 M random fp16 parameters, 1.7 GB
SD15_TEACHER_CKPT = "demo-sd15-teacher.safetensors"
LORA = "demo-sd15-lora.safetensors"
VAE = "demo-vae.safetensors"

TINY_SD = dict(block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=768,
               attention_head_dim=8, norm_num_groups=32, sample_size=64, mid_block_type=None,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_CKPT_UNET = dict(block_out_channels=(320,), layers_per_block=1, cross_attention_dim=768,
                      attention_head_dim=8, sample_size=64, down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",))
SDXL_COMMON = dict(cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
KOALA_TINY = dict(SDXL_COMMON, block_out_channels=(64, 128, 128), layers_per_block=1,
                  transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2))
# ComfyUI's KOALA_700M class: model_channels 320, transformer depth per input block [0, 2, 5].
SDXL_CKPT_UNET = dict(SDXL_COMMON, block_out_channels=(320, 320, 320), layers_per_block=1,
                      transformer_layers_per_block=(1, 2, 5), attention_head_dim=(5, 5, 5), mid_block_type=None)

CLIP_L = dict(width=768, layers=12, mlp=3072)
CLIP_G = dict(width=1280, layers=32, mlp=5120)
VOCAB, CTX = 49408, 77


def _pack_detect():
    """The pack's own structural detection (host-free), for the diffusers -> ldm key names."""
    import_pack()
    return importlib.import_module("distilled_unets.models.structure.detect")


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights, std 0.02 (norms at 1/0) so activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def unet(cfg: dict, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _randomize(UNet2DConditionModel(**cfg), seed).eval()


def to_ldm(sd: dict) -> dict:
    """diffusers UNet keys -> ComfyUI's ldm names (the pack's detection supplies the map)."""
    det = _pack_detect().detect({k: tuple(v.shape) for k, v in sd.items()})
    return {det.key_map[k]: v for k, v in sd.items()}


def clip_hf(prefix: str, dims: dict, seed: int, dtype=torch.float16) -> dict:
    """A random CLIP text encoder in transformers' layout (``text_model.*``) under ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    w, m = dims["width"], dims["mlp"]

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    sd = {f"{prefix}text_model.embeddings.token_embedding.weight": rnd(VOCAB, w),
          f"{prefix}text_model.embeddings.position_embedding.weight": rnd(CTX, w),
          f"{prefix}text_model.final_layer_norm.weight": torch.ones(w, dtype=dtype),
          f"{prefix}text_model.final_layer_norm.bias": torch.zeros(w, dtype=dtype)}
    for i in range(dims["layers"]):
        p = f"{prefix}text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}self_attn.{proj}.weight"] = rnd(w, w)
            sd[f"{p}self_attn.{proj}.bias"] = torch.zeros(w, dtype=dtype)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{ln}.weight"] = torch.ones(w, dtype=dtype)
            sd[f"{p}{ln}.bias"] = torch.zeros(w, dtype=dtype)
        sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"] = rnd(m, w), torch.zeros(m, dtype=dtype)
        sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"] = rnd(w, m), torch.zeros(w, dtype=dtype)
    return sd


def clip_openclip(prefix: str, dims: dict, seed: int, dtype=torch.float16) -> dict:
    """A random OpenCLIP text tower (SDXL's ``conditioner.embedders.1.model.*`` layout) under ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    w, m = dims["width"], dims["mlp"]

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    sd = {f"{prefix}token_embedding.weight": rnd(VOCAB, w), f"{prefix}positional_embedding": rnd(CTX, w),
          f"{prefix}ln_final.weight": torch.ones(w, dtype=dtype), f"{prefix}ln_final.bias": torch.zeros(w, dtype=dtype),
          f"{prefix}text_projection": rnd(w, w)}
    for i in range(dims["layers"]):
        p = f"{prefix}transformer.resblocks.{i}."
        sd[f"{p}attn.in_proj_weight"], sd[f"{p}attn.in_proj_bias"] = rnd(3 * w, w), torch.zeros(3 * w, dtype=dtype)
        sd[f"{p}attn.out_proj.weight"], sd[f"{p}attn.out_proj.bias"] = rnd(w, w), torch.zeros(w, dtype=dtype)
        for ln in ("ln_1", "ln_2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = torch.ones(w, dtype=dtype), torch.zeros(w, dtype=dtype)
        sd[f"{p}mlp.c_fc.weight"], sd[f"{p}mlp.c_fc.bias"] = rnd(m, w), torch.zeros(m, dtype=dtype)
        sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"] = rnd(w, m), torch.zeros(w, dtype=dtype)
    return sd


def taesd(prefix: str, seed: int, latent_channels: int = 4) -> dict:
    """A random TAESD (tiny autoencoder) in its published layout: ``taesd_encoder.N.*`` / ``taesd_decoder.N.*``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, n_in, n_out, k=3, bias=True):
        sd[f"{name}.weight"] = torch.randn(n_out, n_in, k, k, generator=g) * (1.0 / (n_in * k * k)) ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.zeros(n_out)

    def block(name, n_in=64, n_out=64):
        conv(f"{name}.conv.0", n_in, n_out)
        conv(f"{name}.conv.2", n_out, n_out)
        conv(f"{name}.conv.4", n_out, n_out)

    e = f"{prefix}taesd_encoder"
    conv(f"{e}.0", 3, 64)
    block(f"{e}.1")
    i = 2
    for _ in range(3):
        conv(f"{e}.{i}", 64, 64, bias=False)
        for j in range(3):
            block(f"{e}.{i + 1 + j}")
        i += 4
    conv(f"{e}.{i}", 64, latent_channels)
    d = f"{prefix}taesd_decoder"
    conv(f"{d}.1", latent_channels, 64)
    i = 3
    for _ in range(3):
        for j in range(3):
            block(f"{d}.{i + j}")
        conv(f"{d}.{i + 4}", 64, 64, bias=False)  # i+3 is the Upsample (no weights)
        i += 5
    block(f"{d}.{i}")
    conv(f"{d}.{i + 1}", 64, 3)
    sd[f"{prefix}vae_scale"] = torch.tensor(1.0)
    sd[f"{prefix}vae_shift"] = torch.tensor(0.0)
    return sd


def lora_for(unet_sd: dict, clip_width: int = 768, clip_layers: int = 12, rank: int = 4, seed: int = 3) -> dict:
    """kohya-format LoRA on every attention projection of a diffusers-layout UNet and on CLIP's q/v projections."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, out_f, in_f):
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.02).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.02).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()

    for k, v in unet_sd.items():
        if ".attn" in k and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            add("lora_unet_" + k[: -len(".weight")].replace(".", "_"), v.shape[0], v.shape[1])
    for i in range(clip_layers):
        for proj in ("q_proj", "v_proj"):
            add(f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}", clip_width, clip_width)
    return sd


def _save(sd: dict, path: Path, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
              metadata={"distilled_unets_demo": NOISE_NOTE, **(meta or {})})
    tmp.replace(path)


def _fp16(sd: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


#: the demo image+caption folder of the dataset workflow (Load Image-Text (from Folder) reads input/<folder>):
#: (width, height, caption) per image; two sizes, so Make Training Dataset gives two resolution buckets
DEMO_IMAGES = ((64, 64, "a red square on grey"), (64, 64, "a blue circle on white"),
               (128, 64, "a green stripe, wide"), (128, 64, "a yellow stripe, wide"))


def write_image_text_folder(folder: str | Path) -> Path:
    """A small folder of random-noise PNGs with one ``.txt`` caption each, as ComfyUI's Load Image-Text (from
    Folder) reads them: demo input for the dataset workflow, written into a server's OWN input folder (never a
    ComfyUI installation's)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    for i, (w, h, caption) in enumerate(DEMO_IMAGES):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(folder / f"demo_{i:02d}.png")
        (folder / f"demo_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder


def write_sd15(root: Path) -> None:
    student = unet(TINY_SD, seed=0)
    folder = root / "diffusion_models" / STUDENT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(folder), safe_serialization=True)
    ssd = student.state_dict()
    _save(ssd, root / "diffusion_models" / STUDENT_FILE)
    ck = {"model.diffusion_model." + k: v for k, v in to_ldm(unet(SD15_CKPT_UNET, seed=1).state_dict()).items()}
    ck.update(clip_hf("cond_stage_model.transformer.", CLIP_L, seed=2))
    ck.update(taesd("first_stage_model.", seed=4))
    _save(_fp16(ck), root / "checkpoints" / SD15_CKPT)
    _save(lora_for(ssd), root / "loras" / LORA)
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    _save(vae.state_dict(), root / "vae" / VAE)


def full_size_random(structure, seed: int, dtype=torch.float16) -> dict:
    """Random ldm-named weights of a full-size structure of the pack's structure table, drawn directly in
    ``dtype`` (no model is built: shapes from diffusers on the meta device)."""
    import_pack()
    from diffusers import UNet2DConditionModel
    from distilled_unets.models.structure.topology import diffusers_config

    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_config(structure))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    det = _pack_detect().detect(shapes)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        name = det.key_map[k]
        if len(shapes[k]) == 1:
            out[name] = (torch.ones if ("norm" in k and k.endswith("weight")) else torch.zeros)(shapes[k], dtype=dtype)
        else:
            out[name] = (torch.randn(shapes[k], generator=g) * 0.02).to(dtype)
    return out


def write_teacher(root: Path) -> None:
    import_pack()
    from distilled_unets.models.structure.structures import SD1

    ck = {"model.diffusion_model." + k: v for k, v in full_size_random(SD1, seed=21).items()}
    ck.update(clip_hf("cond_stage_model.transformer.", CLIP_L, seed=22))
    ck.update(taesd("first_stage_model.", seed=24))
    _save(ck, root / "checkpoints" / SD15_TEACHER_CKPT)


def write_sdxl(root: Path) -> None:
    _save(unet(KOALA_TINY, seed=10).state_dict(), root / "diffusion_models" / SDXL_STUDENT_FILE)
    ck = {"model.diffusion_model." + k: v for k, v in to_ldm(unet(SDXL_CKPT_UNET, seed=11).state_dict()).items()}
    ck.update(clip_hf("conditioner.embedders.0.transformer.", CLIP_L, seed=12))
    ck.update(clip_openclip("conditioner.embedders.1.model.", CLIP_G, seed=13))
    ck.update(taesd("first_stage_model.", seed=14))
    _save(_fp16(ck), root / "checkpoints" / SDXL_CKPT)


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on ``root/.lock`` (another process writing the same cache waits); none where the OS
    has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(root: str | Path, sdxl: bool = False, teacher: bool = False) -> Path:
    """Write the demo models under ``root`` unless this version already wrote them; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        _ensure(root, sdxl, teacher)
    return root


def _ensure(root: Path, sdxl: bool, teacher: bool) -> None:
    stamp = root / STAMP
    have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if have.get("version") != VERSION:
        have = {"version": VERSION, "note": NOISE_NOTE, "parts": []}
    torch_threads = torch.get_num_threads()
    try:
        for part, fn in (("sd15", write_sd15), ("sdxl", write_sdxl), ("teacher", write_teacher)):
            if part in have["parts"] or (part == "sdxl" and not sdxl) or (part == "teacher" and not teacher):
                continue
            t = time.perf_counter()
            log.info("writing %s demo weights (%s) under %s", part, NOISE_NOTE, root)
            fn(root)
            have["parts"].append(part)
            stamp.write_text(json.dumps(have, indent=1))
            log.info("%s demo weights written in %.1f s", part, time.perf_counter() - t)
    finally:
        torch.set_num_threads(torch_threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models_dir", help="folder laid out like ComfyUI/models to write into")
    ap.add_argument("--sdxl", action="store_true", help="also write the SDXL-class demo models (~1.6 GB)")
    ap.add_argument("--teacher", action="store_true",
                    help="also write the full-structure SD1.5 teacher for the student workflows (~2 GB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure(args.models_dir, sdxl=args.sdxl, teacher=args.teacher)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
