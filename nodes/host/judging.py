"""Judging students on ComfyUI's side: the one engine of the Evaluate Student node and ``tools/evaluate.py``.

* generation with ComfyUI's own sampling (``comfy.sample.prepare_noise`` per (prompt, seed), ``comfy.sample.sample``,
  the VAE's decode), the same noise for the teacher and every student, images quantised to 8 bit exactly as
  SaveImage writes them and saved as PNG files (written to a temporary name, then renamed: never half-written, and
  an image already there is read back, not made again);
* CLIP vision image embeddings (``CLIP_VISION.encode_image(...)["image_embeds"]``), the text tower's pooled,
  projected prompt embedding for the CLIP score (``CLIP.encode_from_tokens(..., return_pooled=True)``) where it
  matches the vision tower, the VAE decoder for the in-training evaluator;
* the checks made before any image: students of the teacher's family, a size the models take, a CLIP vision
  model that is one.

The maths is ``models.students.evaluate``; this module hands it 8-bit images and features.

May import: ``comfy.*`` and ``models`` (never ``folder_paths``, ``server`` or the node API).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ...models.files import atomic
from ...models.students.distill import NoiseSchedule
from ...models.students.evaluate import (
    EvaluationError,
    HeldoutEvaluator,
    ImageSet,
    Judgement,
    format_report,
    judge,
)
from ...models.students.evaluate import metrics as M
from ...models.students.evaluate import plan as P
from ...models.students.evaluate.inception import InceptionFeatures, features_in_batches
from .unet import RECOMMENDED_KEY, topology_of

log = logging.getLogger("distilled_unets")

#: the CLIP vision towers ComfyUI ships configs for, by width (clip_vision_config_vitl / _h / _g.json)
VISION_TOWERS = {1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}
#: text tower (ComfyUI's attribute on the CLIP model) -> the vision tower whose embedding space it projects into
TEXT_FOR_VISION = {"clip_g": "ViT-bigG/14", "clip_h": "ViT-H/14"}
NATIVE_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}
GRID_ROWS = 16
HEAT_GAIN = 4.0


# ------------------------------------------------------------------------------------------------
# checks before any image


def family_of(model, node: str, input_name: str) -> str:
    """'sd1', 'sd2' or 'sdxl' for a MODEL (its UNet structure as ComfyUI built it); anything else is refused."""
    try:
        return topology_of(model).family
    except Exception as e:
        raise EvaluationError("this MODEL is not an SD 1.x / 2.x / SDXL UNet", "connect an SD 1.x, SD 2.x or SDXL "
                              "family model (a checkpoint's MODEL or Load Distilled UNet's)", node=node,
                              input_name=input_name) from e


def check_students(teacher, students: dict[str, object], node: str) -> str:
    """Every student of the teacher's family (same latent space and conditioning); returns the family."""
    fam = family_of(teacher, node, "teacher")
    for name, model in students.items():
        f = family_of(model, node, name)
        if f != fam:
            raise EvaluationError(f"the student is an {f.upper()} model, the teacher an {fam.upper()} one: they do "
                                  "not share latent space and conditioning",
                                  f"connect a student distilled from an {fam.upper()} teacher (or that family's "
                                  "teacher)", node=node, input_name=name)
    return fam


def check_size(width: int, height: int, node: str, family: str) -> tuple[int, int]:
    """(width, height), the family's native size where 0; a size that is not a multiple of 8 of at least 64 is
    refused (the VAE works on 8x8 pixel blocks)."""
    w = width or NATIVE_SIZE[family]
    h = height or NATIVE_SIZE[family]
    for name, v in (("width", w), ("height", h)):
        if v % 8 or v < 64 or v > 16384:
            raise EvaluationError(f"{name} {v} is not a multiple of 8 between 64 and 16384",
                                  f"use a multiple of 8 (e.g. {max(64, v // 8 * 8)}); {family.upper()} models are "
                                  f"trained at {NATIVE_SIZE[family]} px", node=node, input_name=name)
    return w, h


#: a sampler / scheduler value meaning "the student's recommended one" (steps, cfg, width and height: 0)
RECOMMENDED = "recommended"
#: what is used where a value is left to the student and no student carries recommended settings (BK-SDM's
#: protocol: 25 steps, CFG 7.5; euler / normal, ComfyUI KSampler's defaults; the family's native size)
FALLBACK = {"steps": 25, "cfg": 7.5, "sampler": "euler", "scheduler": "normal"}


def recommended_of(students: dict) -> tuple[str | None, dict | None]:
    """(input name, recommended settings) of the first student that carries them (the pack's MODELs of a published
    model's structure do: loaded, built or distilled), else (None, None)."""
    for name, model in students.items():
        rec = model.get_attachment(RECOMMENDED_KEY) if hasattr(model, "get_attachment") else None
        if rec:
            return name, rec
    return None, None


def resolve_settings(students: dict, family: str, node: str, *, steps: int | None, cfg: float | None,
                     sampler: str | None, scheduler: str | None, width: int | None,
                     height: int | None) -> tuple[dict, str]:
    """The sampling settings, each value left to the student (steps, cfg, width, height 0 or None; sampler and
    scheduler "recommended" or None) taken from the first student's recommended settings, else from
    :data:`FALLBACK` and the family's native size; all checked. Returns (steps, cfg, sampler, scheduler, width,
    height as a dict; a line saying where the values left to the student came from, "" when none was)."""
    given = {"steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler, "width": width,
             "height": height}
    auto = [k for k, v in given.items() if v is None or (isinstance(v, str) and v == RECOMMENDED)
            or (not isinstance(v, str) and v == 0)]
    who, rec = recommended_of(students)
    fallback = dict(FALLBACK, width=NATIVE_SIZE[family], height=NATIVE_SIZE[family])
    out = {k: ((rec or fallback)[k] if k in auto else v) for k, v in given.items()}
    out["width"], out["height"] = check_size(out["width"], out["height"], node, family)
    check_sampler(out["sampler"], out["scheduler"], node)
    if out["steps"] < 1:
        raise EvaluationError(f"steps {out['steps']}", "give 1 or more steps (0: the student's recommended)",
                              node=node, input_name="steps")
    note = ""
    if auto:
        what = ", ".join(auto)
        note = (f"{what}: the recommended settings of {rec['model']} ({who})" if rec else
                f"{what}: defaults (no student carries recommended settings: the pack's MODELs of a published "
                "model's structure do)")
    return out, note


def check_sampler(sampler: str, scheduler: str, node: str) -> None:
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise EvaluationError(f"unknown sampler '{sampler}'", "pick one of ComfyUI's samplers (euler, dpmpp_2m, ...)",
                              node=node, input_name="sampler")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise EvaluationError(f"unknown scheduler '{scheduler}'", "pick one of ComfyUI's schedulers (normal, karras, "
                              "...)", node=node, input_name="scheduler")


def vision_tower(clip_vision, node: str = "EvaluateStudent", input_name: str = "clip_vision") -> str:
    """The name of a CLIP_VISION's tower (ViT-L/14, ViT-H/14, ViT-bigG/14, or its width); refuses a value that
    is not an image encoder."""
    if clip_vision is None or not hasattr(clip_vision, "encode_image"):
        raise EvaluationError(f"{type(clip_vision).__name__} is not a CLIP vision model",
                              "connect Load CLIP Vision (ViT-L/14, ViT-H/14 or ViT-bigG/14)", node=node,
                              input_name=input_name)
    proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    w = getattr(proj, "weight", None)
    if w is None:
        return "an image encoder without a projection"
    width = int(w.shape[1])
    return VISION_TOWERS.get(width, f"a CLIP vision tower of width {width}")


#: ComfyUI's configs of the CLIP vision towers the CLIP metrics use (comfy/clip_vision_config_*.json, next to
#: comfy/clip_vision.py; an absolute path is used as it is). ComfyUI picks one by the key of one layer in a file's
#: tensors, then builds it at full size whatever the tensors' shapes; :func:`clip_vision_plan` checks them first.
CLIP_VISION_CONFIGS = ["clip_vision_config_g.json", "clip_vision_config_h.json", "clip_vision_config_vitl_336.json",
                       "clip_vision_config_vitl.json"]
#: the tensor by which ComfyUI's loader knows an OpenAI / open_clip layout (``visual.*``, converted on loading)
OPEN_CLIP_MARK = "visual.transformer.resblocks.0.attn.in_proj_weight"
CLIP_VISION_FIX = ("give a CLIP vision file (clip_vision_g.safetensors, CLIP-ViT-H-14 or ViT-L-14 from "
                   "models/clip_vision)")


def _file_shapes(path: str, what: str, fix: str, input_name: str) -> dict[str, tuple]:
    """{name: shape} of a weight file: a safetensors header (no tensor data read), or a weights-only torch.load;
    typed errors name the file and ``input_name``."""
    from ...models.errors import PackError
    from ...models.files.weights import read_shapes

    if not os.path.isfile(path):
        raise EvaluationError(f"the {what} file does not exist", fix, path=path, input_name=input_name)
    try:
        shapes, _ = read_shapes(path)
    except PackError as e:
        raise EvaluationError(f"the {what} file cannot be read: {e.problem}", fix, path=path,
                              input_name=input_name) from e
    return shapes


def _file_tensors(path: str, names, what: str, fix: str, input_name: str) -> dict[str, torch.Tensor]:
    from ...models.errors import PackError
    from ...models.files.weights import read_tensors

    try:
        return read_tensors(path, names)
    except PackError as e:
        raise EvaluationError(f"the {what} file cannot be read: {e.problem}", fix, path=path,
                              input_name=input_name) from e


def _on_meta(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shape_problem(have: dict[str, tuple], want: dict[str, tuple], required, what: str) -> str | None:
    """Why tensors of shapes ``have`` cannot fill a model of shapes ``want`` (None: they can): a ``required`` tensor
    missing, or any tensor of the model with another shape."""
    missing = [k for k in want if required(k) and k not in have]
    if missing:
        return (f"{len(missing)} tensor(s) of {what} are missing ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): the file is cut or damaged")
    for k, s in want.items():
        if k in have and tuple(have[k]) != tuple(s):
            return f"tensor {k} has shape {list(have[k])}, {what} has {list(s)}"
    return None


@functools.lru_cache(maxsize=16)
def clip_vision_model(path: str) -> tuple[dict, tuple]:
    """(config, the model's ((name, shape), ...)) of a ComfyUI CLIP vision config, built on the meta device (no
    memory)."""
    import comfy.clip_model
    import comfy.ops

    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    return cfg, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def clip_vision_configs() -> list[str]:
    import comfy.clip_vision

    here = os.path.dirname(os.path.realpath(comfy.clip_vision.__file__))
    paths = [c if os.path.isabs(c) else os.path.join(here, c) for c in CLIP_VISION_CONFIGS]
    return [p for p in paths if os.path.isfile(p)]


def clip_vision_plan(shapes: dict[str, tuple], path: str | None = None,
                     input_name: str = "--clip-vision") -> tuple[str, dict[str, tuple], bool]:
    """(ComfyUI config path, the model's {name: shape}, whether the file is in the OpenAI / open_clip layout) of
    a CLIP vision file's tensors, from their shapes alone: the config of as many layers as the tensors hold
    whose every tensor the file has, with its shape. Anything else is refused here, before ComfyUI would build a
    tower at full size from one key name (it picks ViT-bigG/14 if layer 47 is there, ViT-H/14 for layer 30,
    ViT-L/14 for layer 22, and leaves whatever the file lacks uninitialised)."""
    import comfy.clip_vision

    open_clip = OPEN_CLIP_MARK in shapes
    have = shapes
    if open_clip:  # ComfyUI's own conversion, on tensors of no memory
        try:
            meta = comfy.clip_vision.convert_to_transformers(
                _on_meta({k: s for k, s in shapes.items() if k.startswith("visual.")}), "visual.")
        except Exception as e:
            raise EvaluationError(f"the OpenAI / open_clip layout tensors cannot be converted ({type(e).__name__}: "
                                  f"{str(e)[:120]})", CLIP_VISION_FIX, path=path, input_name=input_name) from e
        have = {k: tuple(v.shape) for k, v in meta.items()}
    layers = [int(m.group(1)) for k in have if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))]
    depth = max(layers) + 1 if layers else 0
    candidates = []
    for cfg_path in clip_vision_configs():
        cfg, model = clip_vision_model(cfg_path)
        if int(cfg.get("num_hidden_layers", -1)) == depth:
            candidates.append((cfg_path, cfg, dict(model)))
    if not candidates:
        raise EvaluationError("this is not a CLIP vision model ComfyUI has a config for (ViT-L/14, ViT-H/14, "
                              f"ViT-bigG/14: 24, 32 or 48 layers; its tensors hold {depth})", CLIP_VISION_FIX,
                              path=path, input_name=input_name)
    problems = []
    for cfg_path, cfg, model in candidates:
        tower = VISION_TOWERS.get(int(cfg.get("hidden_size", 0)), os.path.basename(cfg_path))
        why = _shape_problem(have, model, lambda k: True, f"the {tower} tower ComfyUI builds from this file")
        if why is None:
            return cfg_path, model, open_clip
        problems.append(why)
    raise EvaluationError(f"the tensors do not make a CLIP vision tower: {problems[-1]}", CLIP_VISION_FIX, path=path,
                          input_name=input_name)


def check_clip_vision(path: str, input_name: str = "--clip-vision") -> str:
    """The tower a CLIP vision file holds (ViT-L/14, ...), checked from its tensor shapes alone (a safetensors
    file's header: nothing loaded, nothing built); a typed error naming the file otherwise."""
    cfg_path, _, _ = clip_vision_plan(_file_shapes(path, "CLIP vision", CLIP_VISION_FIX, input_name), path,
                                      input_name)
    cfg, _ = clip_vision_model(cfg_path)
    return VISION_TOWERS.get(int(cfg.get("hidden_size", 0)), os.path.basename(cfg_path))


def load_clip_vision(path: str, input_name: str = "--clip-vision"):
    """ComfyUI's CLIP vision model from a file: the file's tensor shapes are checked against the tower ComfyUI
    would build (:func:`clip_vision_plan`) before anything is built, its tensors are read weights-only (a
    safetensors file: only the tower's), and ComfyUI's ``ClipVisionModel`` is built from that config and loaded
    with them. A file that is not a whole CLIP vision tower is refused naming the file."""
    import comfy.clip_vision

    shapes = _file_shapes(path, "CLIP vision", CLIP_VISION_FIX, input_name)
    cfg_path, model, open_clip = clip_vision_plan(shapes, path, input_name)
    names = [k for k in shapes if k.startswith("visual.")] if open_clip else list(model)
    sd = _file_tensors(path, names, "CLIP vision", CLIP_VISION_FIX, input_name)
    try:
        if open_clip:
            sd = comfy.clip_vision.convert_to_transformers(sd, "visual.")
        sd = {k: sd[k] for k in model}
        cv = comfy.clip_vision.ClipVisionModel(cfg_path)
        missing, _ = cv.load_sd(sd)
    except Exception as e:
        raise EvaluationError(f"the file cannot be loaded as a CLIP vision model ({type(e).__name__}: "
                              f"{str(e)[:160]})", CLIP_VISION_FIX, path=path, input_name=input_name) from e
    if missing:  # checked above: ComfyUI would leave these weights uninitialised
        raise EvaluationError(f"ComfyUI's tower has tensors the file lacks ({', '.join(missing[:3])})",
                              CLIP_VISION_FIX, path=path, input_name=input_name)
    return cv


# ------------------------------------------------------------------------------------------------
# text and image embeddings


def encode(clip, text: str):
    """CONDITIONING of ``text``, as CLIP Text Encode makes it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def text_tower(clip) -> str | None:
    """The CLIP model's text tower with a text projection into a CLIP embedding space ('clip_g' of SDXL, 'clip_h'
    of SD 2.x), or None (SD 1.x's CLIP-L comes without its projection)."""
    model = getattr(clip, "cond_stage_model", None)
    for name in TEXT_FOR_VISION:
        if getattr(model, name, None) is not None:
            return name
    return None


def clip_score_text(clip, clip_vision, prompts: list[str]) -> tuple[torch.Tensor | None, str | None]:
    """(pooled, projected text embedding per prompt ``[P, D]``, None) where the CLIP's text tower projects into the
    vision tower's space; (None, why not) otherwise."""
    if clip is None:
        return None, "no CLIP (text encoder) connected"
    tower = vision_tower(clip_vision)
    text = text_tower(clip)
    if text is None:
        return None, ("the text encoder has no text projection (SD 1.x's CLIP-L ships without one); clip_score "
                      "needs SDXL's clip_g with ViT-bigG/14, or SD 2.x's OpenCLIP-H with ViT-H/14")
    if TEXT_FOR_VISION[text] != tower:
        return None, (f"the text tower ({text}) projects into {TEXT_FOR_VISION[text]}'s space, the vision model is "
                      f"{tower}: connect {TEXT_FOR_VISION[text]}")
    out = []
    for p in prompts:
        _, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        out.append(pooled.reshape(-1).float().cpu())
    emb = torch.stack(out)
    return emb, None


def image_embeddings(clip_vision, images_u8: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """CLIP image embeddings ``[N, D]`` of 8-bit images, as CLIP Vision Encode computes them (center crop)."""
    out = []
    for s in range(0, images_u8.shape[0], batch):
        x = images_u8[s:s + batch].float() / 255.0
        with torch.no_grad():
            emb = clip_vision.encode_image(x)["image_embeds"]
        out.append(emb.float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class Settings:
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    width: int
    height: int
    negative: str
    seed: int
    images_per_prompt: int
    batch_size: int = 1


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decode of sampled latents (as VAE Decode), quantised as SaveImage writes them: uint8 [N,H,W,3]."""
    with torch.no_grad():
        img = vae.decode(latents)
    if img.ndim == 5:  # video VAEs give [B, T, H, W, C]
        img = img.reshape(-1, *img.shape[-3:])
    return M.quantize(img[..., :3])


def latent_decoder(vae, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents in the model's space (after ``process_latent_in``) -> images [N, H, W, 3] in 0..1, through the
    model's ``process_latent_out`` and the VAE (the in-training evaluator's ``decode``)."""

    def fn(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = model.model.process_latent_out(latents.float().cpu())
        return decode(vae, x).float() / 255.0

    return fn


def sample_latents(model, positive, negative, seeds: list[int], s: Settings) -> torch.Tensor:
    """Latents of ``len(seeds)`` images of one prompt: each image's noise from its own seed
    (``comfy.sample.prepare_noise``), one sampler run for the batch (``comfy.sample.sample``)."""
    latent = torch.zeros([1, 4, s.height // 8, s.width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = torch.cat([comfy.sample.prepare_noise(latent, seed) for seed in seeds])
    latent = latent.expand(len(seeds), *latent.shape[1:]).contiguous()
    return comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seeds[0])


def png_reads(path: str, size: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` is a complete PNG (of ``size`` (width, height) when given)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.format == "PNG" and (size is None or im.size == size)
    except Exception:
        return False


def write_png(path: str, image_u8: torch.Tensor, text: dict | None = None) -> None:
    """One 8-bit image to ``path``: a temporary file in the same folder, then renamed (never half-written)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic.replacing(path, "wb") as f:
        Image.fromarray(image_u8.numpy(), "RGB").save(f, format="PNG", pnginfo=info, compress_level=4)


def read_pngs(folder: str, pairs: list[P.Pair]) -> torch.Tensor:
    """The 8-bit images ``folder/NNNNNN.png`` of ``pairs``, in order: uint8 [N, H, W, 3]."""
    from PIL import Image

    out = []
    for p in pairs:
        with Image.open(os.path.join(folder, p.file_name)) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))))
    return torch.stack(out)


def generate_folder(model, vae, folder: str, pairs: list[P.Pair], conds: list, negative, s: Settings, *,
                    prompts: list[str], label: str, progress: Callable[[int], None] | None = None,
                    cancel: Callable[[], None] | None = None) -> int:
    """Generate the images of ``pairs`` with ``model`` into ``folder`` (``NNNNNN.png``), skipping those already
    there and readable; ``conds[p]`` is prompt ``p``'s CONDITIONING. Batches of up to ``s.batch_size`` images of
    one prompt. ``progress(n)`` after each batch, ``cancel()`` before each. Returns how many were generated."""
    os.makedirs(folder, exist_ok=True)
    todo = [p for p in pairs if not png_reads(os.path.join(folder, p.file_name), (s.width, s.height))]
    if len(todo) < len(pairs) and progress:
        progress(len(pairs) - len(todo))
    made = 0
    i = 0
    while i < len(todo):
        batch = [todo[i]]
        while (len(batch) < s.batch_size and i + len(batch) < len(todo)
               and todo[i + len(batch)].prompt == batch[0].prompt):
            batch.append(todo[i + len(batch)])
        if cancel:
            cancel()
        latents = sample_latents(model, conds[batch[0].prompt], negative, [p.seed for p in batch], s)
        images = decode(vae, latents)
        for p, img in zip(batch, images):
            write_png(os.path.join(folder, p.file_name), img,
                      {"prompt": prompts[p.prompt], "seed": str(p.seed), "model": label,
                       "settings": json.dumps(asdict(s), sort_keys=True)})
        made += len(batch)
        i += len(batch)
        if progress:
            progress(len(batch))
    return made


# ------------------------------------------------------------------------------------------------
# features, judging, grid


def resized(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """8-bit images resized to ``size`` x ``size`` with PIL's bicubic filter (BK-SDM resizes its 512 px images to
    256 px this way before FID)."""
    from PIL import Image

    out = [torch.from_numpy(np.array(Image.fromarray(im.numpy(), "RGB").resize((size, size), Image.BICUBIC)))
           for im in images_u8]
    return torch.stack(out)


def features(images_u8: torch.Tensor, clip_vision=None, inception: InceptionFeatures | None = None,
             inception_size: int = 0) -> ImageSet:
    """The images with their CLIP embeddings and Inception features (each where its model is given); the
    Inception sees them resized to ``inception_size`` when it is set (0: as saved)."""
    s = ImageSet(images_u8)
    if clip_vision is not None:
        s.clip = image_embeddings(clip_vision, images_u8)
    if inception is not None:
        src = resized(images_u8, inception_size) if inception_size else images_u8
        s.pool, s.logits = features_in_batches(inception, src)
    return s


def judge_all(teacher: ImageSet, students: dict[str, ImageSet], pairs: list[P.Pair], *,
              text: torch.Tensor | None, text_note: str | None, reference_stats=None,
              seed: int = 0) -> dict[str, Judgement]:
    per_image_text = text[[p.prompt for p in pairs]] if text is not None else None
    device = mm.get_torch_device()  # the image comparisons on the GPU where there is one
    return {name: judge(teacher, st, text=per_image_text, text_note=text_note, reference_stats=reference_stats,
                        seed=seed, device=device) for name, st in students.items()}


def heat(teacher_u8: torch.Tensor, student_u8: torch.Tensor) -> torch.Tensor:
    """The difference heat map: mean |teacher - student| over RGB, x4, on a black-red-yellow-white scale."""
    d = (teacher_u8.float() - student_u8.float()).abs().mean(-1) / 255.0
    h = (d * HEAT_GAIN).clamp(0, 1)
    return torch.stack([(3 * h).clamp(0, 1), (3 * h - 1).clamp(0, 1), (3 * h - 2).clamp(0, 1)], dim=-1)


def comparison_grid(teacher_u8: torch.Tensor, students_u8: list[torch.Tensor], rows: int = GRID_ROWS) -> torch.Tensor:
    """IMAGE [1, rows x H, (1 + 2 S) x W, 3]: per (prompt, seed) row the teacher, then each student and its
    difference heat map (the first ``rows`` pairs)."""
    n = min(rows, teacher_u8.shape[0])
    out = []
    for i in range(n):
        row = [teacher_u8[i].float() / 255.0]
        for s in students_u8:
            row += [s[i].float() / 255.0, heat(teacher_u8[i], s[i])]
        out.append(torch.cat(row, dim=1))
    return torch.cat(out, dim=0)[None]


def free_memory() -> None:
    mm.soft_empty_cache()


# ------------------------------------------------------------------------------------------------
# the whole evaluation (node and tool)

#: samplers whose per-step noise is drawn for the whole batch: run one image at a time so that each image
#: depends only on its own seed
STOCHASTIC = ("ancestral", "sde", "lcm", "restart", "er_sde", "seeds_")


@dataclass
class Outcome:
    results: dict[str, Judgement]
    report: str
    grid: torch.Tensor                 # IMAGE [1, H', W', 3]
    images: dict[str, torch.Tensor]    # name -> uint8 [N, H, W, 3] ("teacher" first)
    metrics: dict                      # what metrics.json holds


def effective_settings(s: Settings) -> Settings:
    if s.batch_size > 1 and any(t in s.sampler for t in STOCHASTIC):
        log.info("sampler %s draws its per-step noise per batch: generating one image at a time", s.sampler)
        return Settings(**dict(asdict(s), batch_size=1))
    return s


def prepare_folder(folder: str, manifest: dict, *, node: str, input_name: str, rank: int = 0) -> None:
    """Use ``folder`` for images described by ``manifest``: new, or holding images of the very same model and
    settings (those are reused); a folder holding other images is refused (nothing is ever overwritten)."""
    old = P.read_manifest(folder)
    if old is not None and old.get("key") != manifest["key"]:
        raise EvaluationError(f"{folder} holds images made with another {', '.join(P.differences(old, manifest))}",
                              "pick another output folder (its images are kept)", path=folder, node=node,
                              input_name=input_name)
    if old is None and os.path.isdir(folder) and any(f.endswith(".png") for f in os.listdir(folder)):
        raise EvaluationError(f"{folder} holds images this evaluation did not make",
                              "pick another output folder (its images are kept)", path=folder, node=node,
                              input_name=input_name)
    if rank == 0:
        atomic.remove_partial(folder)
        if old is None:
            P.write_manifest(folder, manifest)


def run_evaluation(teacher, students: dict, clip, vae, prompts: list[str], s: Settings, out_dir: str, *,
                   model_ids: dict[str, dict], clip_vision=None, inception: InceptionFeatures | None = None,
                   inception_note: str = "", inception_size: int = 0, reference_stats=None, stats_note: str = "",
                   settings_note: str = "", node: str = "EvaluateStudent",
                   rank: int = 0, world: int = 1, progress: Callable[[int], None] | None = None,
                   cancel: Callable[[], None] | None = None, barrier: Callable[[], None] | None = None,
                   folder_input: str = "out") -> Outcome | None:
    """Generate (this rank's share of) every model's images into ``out_dir/<name>/NNNNNN.png``, then on rank 0
    judge each student against the teacher from the files and write ``metrics.json`` and ``grid.png`` there.
    ``students``: {folder name: MODEL}; ``model_ids``: {"teacher" / folder name: what identifies the model}
    (manifests). Returns the outcome on rank 0, None on the others."""
    s = effective_settings(s)
    all_pairs = P.pairs(len(prompts), s.images_per_prompt, s.seed)
    mine = P.share(all_pairs, rank, world)
    models = {"teacher": teacher, **students}
    settings = {k: v for k, v in asdict(s).items() if k != "batch_size"}
    seeds = [p.seed for p in all_pairs]
    folders = {name: os.path.join(out_dir, name) for name in models}
    for name in models:
        prepare_folder(folders[name], P.manifest_for(model_ids[name], settings, prompts, seeds), node=node,
                       input_name=folder_input, rank=rank)
    if barrier:
        barrier()
    conds = [encode(clip, p) for p in prompts]
    negative = encode(clip, s.negative)
    for name, model in models.items():
        made = generate_folder(model, vae, folders[name], mine, conds, negative, s, prompts=prompts, label=name,
                               progress=progress, cancel=cancel)
        log.info("%s: %d image(s) generated, %d already there", name, made, len(mine) - made)
    if barrier:
        barrier()
    if rank != 0:
        return None
    if cancel:
        cancel()
    images = {name: read_pngs(folders[name], all_pairs) for name in models}
    sets = {name: features(img, clip_vision, inception, inception_size) for name, img in images.items()}
    text, text_note = (None, None)
    tower = None
    if clip_vision is not None:
        tower = vision_tower(clip_vision, node)
        text, text_note = clip_score_text(clip, clip_vision, prompts)
    results = judge_all(sets["teacher"], {k: v for k, v in sets.items() if k != "teacher"}, all_pairs, text=text,
                        text_note=text_note, reference_stats=reference_stats, seed=s.seed)
    grid = comparison_grid(images["teacher"], [images[k] for k in students])
    n = len(all_pairs)
    header = [f"Evaluate Student: {n} image pairs per student ({len(prompts)} prompt(s) x {s.images_per_prompt} "
              f"seed(s); image k of every prompt uses seed {s.seed} + k, the same noise for teacher and students)",
              f"{s.width}x{s.height}, {s.sampler} / {s.scheduler}, {s.steps} steps, CFG {s.cfg:g}; images compared "
              "as saved (8-bit PNG)",
              f"CLIP vision: {tower or 'none'}; Inception: {inception_note or 'none'}"
              + (f" (images resized to {inception_size} px for it)" if inception and inception_size else "")
              + (f"; reference statistics: {stats_note}" if stats_note else ""),
              f"images and metrics.json: {out_dir}"]
    if settings_note:
        header.insert(2, f"({settings_note})")
    footer = ["", f"grid: teacher | student | difference x{HEAT_GAIN:g} (black = same, white = far) per row, the "
              f"first {min(n, GRID_ROWS)} of {n} pairs"]
    report = format_report(results, header=header, footer=footer)
    metrics = {"version": 1, "settings": asdict(s), "settings_from": settings_note or None, "prompts": prompts,
               "seeds": f"image k of every prompt uses seed {s.seed} + k", "pairs": n,
               "clip_vision": tower, "inception": inception_note or None, "inception_size": inception_size or None,
               "reference_stats": stats_note or None,
               "students": {k: j.to_json() for k, j in results.items()},
               "files": {name: os.path.relpath(folders[name], out_dir) for name in models}}
    atomic.write_json(os.path.join(out_dir, "metrics.json"), metrics, indent=1)
    write_png(os.path.join(out_dir, "grid.png"), M.quantize(grid[0]))
    return Outcome(results, report, grid, images, metrics)


def image_feature_fn(clip_vision) -> Callable[[torch.Tensor], torch.Tensor]:
    """images ``[N, H, W, 3]`` in 0..1 (8-bit values / 255) -> CLIP image embeddings: the in-training evaluator's
    ``image_features``."""
    return lambda images: image_embeddings(clip_vision, (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8))


# ------------------------------------------------------------------------------------------------
# evaluation while distilling (the engine calls it: models/students/eval_hook.py)


#: the SD 1.x / 2.x / SDXL VAE (ComfyUI's AutoencoderKL in its default configuration) and its latent channels
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
LATENT_CHANNELS = 4
VAE_FIX = ("give the teacher's VAE: an SD 1.x / 2.x / SDXL VAE file (models/vae), a TAESD of 4 latent channels, "
           "or the teacher's full checkpoint")
#: tensors a decoder needs; the encoder's may be missing (the evaluation only decodes)
VAE_DECODER = ("decoder.", "post_quant_conv.", "taesd_decoder.")


@functools.lru_cache(maxsize=2)
def vae_shapes(kind: str) -> tuple:
    """((name, shape), ...) of the VAE ComfyUI builds for ``kind`` ('kl': the SD VAE, 'taesd'), on the meta
    device."""
    with torch.device("meta"):
        if kind == "taesd":
            import comfy.taesd.taesd

            model = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
        else:
            from comfy.ldm.models.autoencoder import AutoencoderKL

            model = AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=LATENT_CHANNELS)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def vae_plan(shapes: dict[str, tuple], path: str | None = None,
             input_name: str = "--vae") -> tuple[str, dict[str, str], dict[str, tuple], bool]:
    """(kind, {VAE tensor name: the file's name}, the model's {name: shape}, diffusers layout) of a VAE file, a
    TAESD file or a full checkpoint (``first_stage_model.*``), from tensor shapes alone: anything but an SD-family
    VAE of 4 latent channels whose decoder is whole is refused before ComfyUI builds one (ComfyUI picks among a
    dozen VAEs by key names and sizes some from the tensors' shapes)."""
    import comfy.diffusers_convert

    prefix = "first_stage_model."
    names = {k[len(prefix):]: k for k in shapes if k.startswith(prefix)} or {k: k for k in shapes}
    have = {k: shapes[f] for k, f in names.items()}
    diffusers = "decoder.up_blocks.0.resnets.0.norm1.weight" in have
    if diffusers:  # ComfyUI's own renaming, on tensors of no memory
        try:
            order = list(have)
            converted = comfy.diffusers_convert.convert_vae_state_dict(_on_meta(have))
            back = dict(zip(converted, order)) if len(converted) == len(order) else None
        except Exception as e:
            raise EvaluationError(f"the diffusers-layout VAE tensors cannot be converted ({type(e).__name__}: "
                                  f"{str(e)[:120]})", VAE_FIX, path=path, input_name=input_name) from e
        if back is None:
            raise EvaluationError("two tensors of the diffusers-layout VAE have one name once converted", VAE_FIX,
                                  path=path, input_name=input_name)
        have = {k: tuple(v.shape) for k, v in converted.items()}
        names = {k: names[back[k]] for k in converted}
    if "taesd_decoder.1.weight" in have:
        kind, what = "taesd", f"a TAESD of {LATENT_CHANNELS} latent channels"
    elif "decoder.conv_in.weight" in have:
        kind, what = "kl", "the SD 1.x / 2.x / SDXL VAE"
    else:
        raise EvaluationError("this file holds no VAE decoder (no decoder.* or taesd_decoder.* tensors)", VAE_FIX,
                              path=path, input_name=input_name)
    model = dict(vae_shapes(kind))
    first = "taesd_decoder.1.weight" if kind == "taesd" else "decoder.conv_in.weight"
    if len(have[first]) == 4 and have[first][1] != LATENT_CHANNELS:
        raise EvaluationError(f"this is a VAE of {have[first][1]} latent channels ({first} has shape "
                              f"{list(have[first])}); the teacher's latents have {LATENT_CHANNELS} (SD 3's and Flux's "
                              "VAEs have 16)", VAE_FIX, path=path, input_name=input_name)
    why = _shape_problem(have, model, lambda k: k.startswith(VAE_DECODER), what)
    if why:
        raise EvaluationError(f"this is not a VAE the teacher's latents decode with: {why}", VAE_FIX, path=path,
                              input_name=input_name)
    return kind, {k: names[k] for k in model if k in names}, model, diffusers


def load_vae(path: str, input_name: str = "--vae"):
    """ComfyUI's VAE from a VAE file, a TAESD file or a full checkpoint (its ``first_stage_model.`` part): the
    file's tensor shapes are checked against the SD-family VAE first (:func:`vae_plan`), only the VAE's tensors
    are read (weights-only), and ComfyUI builds its VAE from them alone. Anything else is refused naming the
    file."""
    import comfy.sd

    shapes = _file_shapes(path, "VAE", VAE_FIX, input_name)
    kind, names, model, diffusers = vae_plan(shapes, path, input_name)
    raw = _file_tensors(path, sorted(set(names.values())), "VAE", VAE_FIX, input_name)
    try:
        sd = {k: raw[f] for k, f in names.items()}
        if diffusers:  # the renaming was made on the shapes (names: converted name -> the file's); then reshape
            sd = {k: v.reshape(model[k]) for k, v in sd.items()}
        vae = comfy.sd.VAE(sd=sd)
    except Exception as e:
        raise EvaluationError(f"ComfyUI cannot build a VAE from it ({type(e).__name__}: {str(e)[:160]})", VAE_FIX,
                              path=path, input_name=input_name) from e
    if getattr(vae, "latent_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
        raise EvaluationError(f"ComfyUI built a VAE of {vae.latent_channels} latent channels", VAE_FIX, path=path,
                              input_name=input_name)
    return vae


def heldout_evaluator(teacher, heldout, vae, clip_vision=None, *, prediction: str, steps: int = 8, seed: int = 0,
                      node: str = "DistillStudentUNet", features: bool | None = None):
    """The image evaluator of a distillation run (``models.students.evaluate.HeldoutEvaluator``): teacher MODEL
    and student sampled from the same noise on the held-out conditionings, decoded by ``vae`` (the teacher's),
    judged (PSNR, SSIM, MS-SSIM; the CLIP metrics with ``clip_vision``). None without held-out samples.

    Under ``torchrun`` only rank 0 evaluates: the other processes pass ``vae`` / ``clip_vision`` None and
    ``features`` (whether rank 0 has a CLIP vision model), so that every rank declares the same metrics."""
    if heldout is None or len(heldout) == 0:
        return None
    if clip_vision is not None:
        vision_tower(clip_vision, node=node, input_name="clip_vision")
    schedule = NoiseSchedule(teacher.get_model_object("model_sampling"), prediction=prediction)
    decode = latent_decoder(vae, teacher) if vae is not None else _rank0_only
    if clip_vision is not None:
        image_features = image_feature_fn(clip_vision)
    else:
        image_features = _rank0_only if features else None
    return HeldoutEvaluator(teacher.model.diffusion_model, schedule, heldout, decode, image_features=image_features,
                            steps=steps, seed=seed)


def _rank0_only(*_):
    raise RuntimeError("the held-out evaluation runs on rank 0 only")
