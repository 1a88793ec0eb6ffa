"""Everything the loader nodes decide without ComfyUI: which files to read, what they hold, how to rename
them, what the prediction type is, and what to tell the user.

* :func:`read_unet` checks and detects a UNet (file, diffusers folder, shard) without reading tensor data;
  every error it raises names the file.
* :func:`prediction_hint` reads the prediction type from a pipeline's scheduler config, the file's
  metadata (this pack's key, ``modelspec.prediction_type``, ComfyUI ``ModelSave``'s
  ``modelspec.predict_key`` and its ``v_pred`` / ``ztsnr`` marker tensors) or the file name.
* :func:`ldm_state_dict` renames the file's tensors to ComfyUI's names; :func:`check_state_dict`
  refuses, before anything is loaded, tensors that do not fill the built UNet exactly.
* :func:`recipe_of` / :func:`block_map_of` read back what ``SaveStudentUNet`` wrote.
* :func:`resolve_pipeline` finds the parts of a diffusers pipeline folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ..errors import IncompleteModelError, NotAUNetError, PackError, WeightFileError
from ..structure import registry
from ..structure.blockmap import BlockMap
from ..structure.detect import Detection, condconv_paths, detect, from_diffusers_config
from ..structure.topology import Topology
from .weights import DIFFUSERS_NAMES, Source, inspect_safetensors, resolve_unet_source, source_shapes

log = logging.getLogger("distilled_unets")

#: metadata keys this pack writes into the files it saves
META_PREDICTION = "distilled_unets.prediction_type"
META_RECIPE = "distilled_unets.recipe"
META_BLOCK_MAP = "distilled_unets.block_map"
#: top-level marker tensors ComfyUI's ModelSave / CheckpointSave write next to the UNet
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
TEXT_ENCODER_NAMES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


@dataclass
class UnetFile:
    """A checked, detected UNet on disk (nothing but headers read)."""
    source: Source
    detection: Detection
    metadata: dict
    shapes: dict = field(repr=False)  # every tensor of the file(s): name -> shape
    condconv: dict = field(default_factory=dict)  # ldm conv path -> experts (A-SDM CondConv layers)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.source.name))

    @property
    def topology(self) -> Topology:
        return self.detection.topology

    @property
    def params(self) -> int:
        n = 0
        for k, s in self.shapes.items():
            if k.startswith(self.detection.prefix) and k[len(self.detection.prefix):] in self.detection.key_map:
                p = 1
                for d in s:
                    p *= d
                n += p
        return n


def named(e: PackError, path: str) -> PackError:
    """The same error, naming ``path`` when it names no file yet."""
    if not e.path:
        e.path = path
    return e


def read_unet(path: str) -> UnetFile:
    """Check and detect the UNet at ``path`` (file or folder) without building anything."""
    src = resolve_unet_source(path)
    try:
        shapes, meta = source_shapes(src)
        plain, cc = plain_view(shapes)
        det = detect(plain)
    except PackError as e:
        raise named(e, src.name) from None
    condconv = {}
    n = len(det.prefix)
    for file_path, experts in cc.items():  # the routing tensors go where their conv goes
        rel = file_path[n:]
        ldm = det.key_map.get(f"{rel}.weight", "") if file_path.startswith(det.prefix) else ""
        if not ldm.endswith(".weight"):
            raise NotAUNetError(f"'{file_path}' has CondConv experts but is no convolution of the UNet",
                                "the file is damaged; download it again", path=src.name)
        ldm = ldm[: -len(".weight")]
        for name in ("routing_weight", "routing_bias"):
            det.key_map[f"{rel}.{name}"] = f"{ldm}.{name}"
        condconv[ldm] = experts
    if src.config is not None and "block_out_channels" in src.config:
        try:
            cfg_topo = from_diffusers_config(src.config)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):  # PackError too
            cfg_topo = None
        if cfg_topo is not None and cfg_topo.signature() != det.topology.signature():
            log.warning("config.json of %s describes %s, but the weights are %s; using the weights",
                        src.name, cfg_topo.describe(), det.topology.describe())
    return UnetFile(src, det, meta, shapes, condconv)


def plain_view(shapes: dict) -> tuple[dict, dict[str, int]]:
    """The shapes a plain UNet would have (CondConv experts seen as one kernel, routing left out), for the
    structural detection, and the CondConv layers found ({file path: experts})."""
    cc = condconv_paths(shapes)
    if not cc:
        return shapes, {}
    out = dict(shapes)
    for path in cc:
        for name in ("weight", "bias"):
            if f"{path}.{name}" in out:
                out[f"{path}.{name}"] = tuple(out[f"{path}.{name}"])[1:]
        out.pop(f"{path}.routing_weight", None)
        out.pop(f"{path}.routing_bias", None)
    return out, cc


def prediction_hint(f: UnetFile) -> tuple[str | None, bool, str]:
    """(prediction or None when nothing says, zero-terminal-SNR, where it came from)."""
    zsnr = ZTSNR_KEY in f.shapes
    src, meta = f.source, f.metadata
    if src.folder:
        sched = os.path.join(os.path.dirname(os.path.abspath(src.folder)), "scheduler", "scheduler_config.json")
        if os.path.isfile(sched):
            try:
                with open(sched, encoding="utf-8") as fh:
                    cfg = json.load(fh)
            except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
                cfg = None
            p = cfg.get("prediction_type") if isinstance(cfg, dict) else None
            if isinstance(p, str) and p:
                zsnr = zsnr or bool(cfg.get("rescale_betas_zero_snr"))
                return _pred(p), zsnr, "scheduler_config.json"
    for key in (META_PREDICTION, "modelspec.prediction_type", "modelspec.predict_key"):
        p = str(meta.get(key, "")).strip().lower()
        if p:
            return _pred(p), zsnr, f"file metadata ({key})"
    if V_PRED_KEY in f.shapes:
        return "v_prediction", zsnr, "the file's v_pred marker (ComfyUI ModelSave)"
    name = f.name.lower()
    if any(t in name for t in ("v-pred", "vpred", "v_pred", "768-v")):
        return "v_prediction", zsnr, "file name"
    return None, zsnr, ""


def _pred(p: str) -> str:
    return "v_prediction" if p.startswith("v") else "eps"


def ldm_state_dict(f: UnetFile, sd: dict) -> dict:
    """The UNet tensors of ``sd`` (keyed as in the file) under ComfyUI's ldm names."""
    det = f.detection
    n = len(det.prefix)
    return {det.key_map[k[n:]]: v for k, v in sd.items() if k.startswith(det.prefix) and k[n:] in det.key_map}


def check_state_dict(want: dict, have: dict, path: str | None = None) -> None:
    """Refuse weights that do not fill the built UNet exactly: ``want``/``have`` map names to shapes."""
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(k for k in have if k not in want)
    wrong = sorted(k for k in want if k in have and tuple(have[k]) != tuple(want[k]))
    if missing:
        raise IncompleteModelError(f"{len(missing)} UNet tensors are missing for the detected structure "
                                   f"(e.g. {', '.join(missing[:3])})",
                                   "the file is incomplete or damaged; download it again", path=path)
    if unexpected or wrong:
        ex = (unexpected + wrong)[:3]
        raise NotAUNetError(f"{len(unexpected)} unexpected and {len(wrong)} wrongly shaped tensors for the detected "
                            f"structure (e.g. {', '.join(ex)})",
                            "this is not a UNet this pack can build; report the model with its file name", path=path)


def recipe_of(meta: dict) -> dict | None:
    """The build recipe a file saved by this pack carries (preset, teacher, ...), or None."""
    raw = meta.get(META_RECIPE)
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        log.warning("ignoring an unreadable %s in the file's metadata", META_RECIPE)
        return None
    return d if isinstance(d, dict) else None


def block_map_of(meta: dict, topology: Topology) -> BlockMap | None:
    """The block map a file saved by this pack carries, when it fits the detected structure."""
    raw = meta.get(META_BLOCK_MAP)
    if not raw:
        return None
    try:
        return BlockMap.from_json(raw, topology)
    except ValueError as e:
        log.warning("ignoring the file's block map: %s", e)
        return None


def recipe_lines(recipe: dict, bm: BlockMap | None) -> list[str]:
    """What a saved student's recipe says, for the loader's info."""
    lines = [f"Built by this pack: preset {recipe.get('preset', '?')} from teacher "
             f"{recipe.get('teacher') or 'unnamed'} (sha256 {str(recipe.get('teacher_sha256', '?'))[:16]}...)"]
    runs = recipe.get("distilled") or []
    for run in runs if isinstance(runs, list) else []:
        if isinstance(run, dict):
            before, after = run.get("heldout_before"), run.get("heldout_after")
            held = (f"; held-out output-KD error {before:.4g} -> {after:.4g}"
                    if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "")
            lines.append(f"Distilled here: {run.get('steps', '?')} steps, {run.get('samples_seen', '?')} samples, "
                         f"train {run.get('train', '?')}, loss {run.get('loss_weights', '?')}{held}")
    if bm is not None:
        c = bm.counts()
        lines.append(f"Block map: {c.get('teacher', 0)} tensors from the teacher, {c.get('base', 0)} from the base "
                     f"student, {c.get('new', 0)} new; teacher LoRAs map by it exactly")
    return lines


def info(f: UnetFile, prediction: str, why: str) -> tuple[str, dict]:
    """(info text, description dict) of a loaded UNet."""
    hint = " ".join([os.path.normpath(f.source.name), str(f.metadata.get("modelspec.title", ""))])
    d = registry.describe(f.topology, hint, f.params)
    text = registry.info_text(d, f.detection.layout, f"{prediction} ({why})")
    recipe = recipe_of(f.metadata)
    if recipe is not None:
        text += "\n" + "\n".join(recipe_lines(recipe, block_map_of(f.metadata, f.topology)))
    if f.condconv:
        experts = sorted(set(f.condconv.values()))
        text += (f"\nCondConv (A-SDM): {len(f.condconv)} convolutions with {'/'.join(map(str, experts))} experts "
                 f"({', '.join(sorted(f.condconv))}); ComfyUI's own UNet loaders cannot read this file, this node "
                 "builds ComfyUI's UNet and swaps exactly those convolutions; LoRAs do not patch them")
    return text, d


@dataclass
class Pipeline:
    folder: str
    unet: str
    text_encoders: list[str]
    vae: str


def resolve_pipeline(folder: str) -> Pipeline:
    """The UNet folder, text-encoder files and VAE file of a diffusers pipeline folder (all checked)."""
    parts = {p: os.path.join(folder, p) for p in ("unet", "text_encoder", "text_encoder_2", "vae")}
    missing = [p for p in ("unet", "text_encoder", "vae") if not os.path.isdir(parts[p])]
    if missing:
        raise IncompleteModelError(f"the pipeline folder has no {', '.join(m + '/' for m in missing)}",
                                   "download the complete pipeline (unet/, text_encoder/, vae/)", path=folder)
    te = [_first(parts["text_encoder"], TEXT_ENCODER_NAMES)]
    if os.path.isdir(parts["text_encoder_2"]):
        te.append(_first(parts["text_encoder_2"], TEXT_ENCODER_NAMES))
    vae = _first(parts["vae"], DIFFUSERS_NAMES)
    if None in te or vae is None:
        raise IncompleteModelError("a text encoder or the VAE has no weights file",
                                   "finish downloading text_encoder*/model.safetensors and "
                                   "vae/diffusion_pytorch_model.safetensors", path=folder)
    for p in te + [vae]:
        if p.endswith(".safetensors"):
            inspect_safetensors(p)  # a truncated file fails here with its name, not deep in ComfyUI
    return Pipeline(folder, parts["unet"], te, vae)


def _first(folder: str, file_names) -> str | None:
    for n in file_names:
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return p
    return None


def missing_file(what: str, name: str, folders: str) -> WeightFileError:
    """The error for a picked name that is not on disk (any more)."""
    return WeightFileError(f"{what} '{name}' is not under {folders}",
                           "refresh the node list (press R) and pick an existing entry", path=name)
