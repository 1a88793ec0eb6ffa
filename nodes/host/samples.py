"""ComfyUI training samples -> the distillation engine's inputs, through the teacher's own model code.

One conversion for every path: the ``DistillStudentUNet`` node's LATENT + CONDITIONING (one value, or the
lists ``MakeTrainingDataset`` / ``LoadTrainingDataset`` / ``ResolutionBucket`` output), the streamed
``SaveTrainingDataset`` folders (``models.students.distill.datasets.ShardedDataset`` calls :func:`prepare_sample` per
sample) and the headless trainer ``tools/distill.py``. Imports only torch, ``comfy.*`` and the pack's host-free
``models`` (no node API, no server, no folder_paths), so a script can use it with ComfyUI as a library.

* :func:`prepare_sample` - one sample: the latent through the model's ``process_latent_in``, the conditioning
  through its ``extra_conds`` (cross-attention context; SDXL's pooled and size vector ``y``).
* :func:`pair_samples` - ComfyUI's LATENT / CONDITIONING values (single or lists) -> per-sample pairs.
* :func:`make_kd_data` - those pairs as the engine's in-memory :class:`KDData`.
"""

from __future__ import annotations

import torch

from ...models.students.distill import DistillError, KDData

#: what to connect, for the refusals
LATENT_SOURCES = ("connect a LATENT (VAE Encode, a KSampler) or the latents list of Make / Load Training Dataset "
                  "or Resolution Bucket")
COND_SOURCES = ("connect a CONDITIONING (CLIP Text Encode) or the conditioning list of Make / Load Training "
                "Dataset or Resolution Bucket")


def _is_entry(x) -> bool:
    """One CONDITIONING entry: ``[tensor, {options}]``."""
    return isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], torch.Tensor) and isinstance(x[1], dict)


def _base_model(model):
    """ComfyUI's BaseModel from a BaseModel or a ModelPatcher (MODEL)."""
    return model if hasattr(model, "extra_conds") else model.model


def latent_in(model, latent: torch.Tensor) -> torch.Tensor:
    """``[1, C, H, W]`` (or ``[C, H, W]``) VAE latent -> ``[C, H, W]`` in the model's space, fp32 on the CPU."""
    x = latent if latent.ndim == 4 else latent[None]
    return _base_model(model).process_latent_in(x.detach().float().cpu())[0]


def conditioning_in(model, entry, x0: torch.Tensor, *, node: str | None = None,
                    input_name: str | None = "conditioning") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One CONDITIONING entry ``[cond, {...}]`` for a sample ``x0`` ``[C, H, W]`` -> (context ``[L, D]``, ``y``
    ``[adm]`` or None), through the model's own ``extra_conds`` (sizes default to the latent's, as ComfyUI does
    when a CLIP Text Encode gives none)."""
    c, d = entry
    params = dict(d)
    params.update(cross_attn=c, device=torch.device("cpu"), noise=x0[None])
    params.setdefault("width", x0.shape[-1] * 8)
    params.setdefault("height", x0.shape[-2] * 8)
    params.setdefault("prompt_type", "positive")
    try:
        out = _base_model(model).extra_conds(**params)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise DistillError(f"the teacher cannot use this conditioning ({type(e).__name__}: {e})",
                           "encode the captions with the teacher family's CLIP (SDXL needs its pooled output: "
                           "CLIP Text Encode with an SDXL CLIP)", node=node, input_name=input_name) from e
    if "c_concat" in out:
        raise DistillError("inpainting / instruct models (extra input channels) cannot be distilled here",
                           "use a text-to-image teacher", node=node, input_name="teacher")
    ctx = out["c_crossattn"].cond
    y = out["y"].cond.reshape(-1).float().cpu() if "y" in out else None
    return ctx.reshape(-1, ctx.shape[-1]).float().cpu(), y


def _one_entry(conditioning, *, node, input_name):
    """The single entry of a sample's conditioning (a CONDITIONING with one entry, or the entry itself)."""
    if _is_entry(conditioning):
        return conditioning
    if isinstance(conditioning, (list, tuple)) and len(conditioning) == 1 and _is_entry(conditioning[0]):
        return conditioning[0]
    n = len(conditioning) if isinstance(conditioning, (list, tuple)) else 0
    raise DistillError(f"a sample's conditioning is not one CLIP Text Encode output ({n} entries)",
                       "give every image one caption (Make Training Dataset does); combined or scheduled "
                       "conditionings cannot pair with one image", node=node, input_name=input_name)


def prepare_sample(model, latent: torch.Tensor, conditioning, *, node: str | None = None,
                   input_name: str | None = "data") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One ComfyUI training sample -> the engine's ``(x0 [C, H, W], context [L, D], y [adm] or None)``.

    ``model``: ComfyUI's BaseModel (``MODEL.model``) or the MODEL itself: the teacher, whose latent format and
    conditioning code define what the UNets see. ``latent``: the VAE latent ``[1, C, H, W]`` as Make Training
    Dataset stores it. ``conditioning``: that sample's CONDITIONING (one entry) or the entry ``[cond, {...}]``.
    The ``prepare`` callable of ``models.students.distill.datasets.ShardedDataset``: bind the model with
    ``functools.partial(prepare_sample, model)``."""
    x0 = latent_in(model, latent)
    ctx, y = conditioning_in(model, _one_entry(conditioning, node=node, input_name=input_name), x0, node=node,
                             input_name=input_name)
    return x0, ctx, y


def _split_batched(entry, n: int) -> list:
    """One entry holding a batch of ``n`` prompts -> ``n`` entries (tensors in its options split alike)."""
    c, d = entry
    out = []
    for i in range(n):
        di = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
              for k, v in d.items()}
        out.append([c[i:i + 1], di])
    return out


def _entries(cond, *, node, input_name) -> list:
    """The entries of one CONDITIONING value (a list of ``[cond, {...}]``)."""
    if not isinstance(cond, (list, tuple)) or not cond or not all(_is_entry(e) for e in cond):
        raise DistillError("this is not a CONDITIONING (a list of [tensor, options] entries)", COND_SOURCES,
                           node=node, input_name=input_name)
    return list(cond)


def _for_batch(entries: list, b: int) -> list:
    """``b`` per-sample entries from a CONDITIONING's entries (one per sample, one batched, or one for all);
    None when they do not fit ``b`` samples."""
    if len(entries) == b:
        return entries
    if len(entries) == 1:
        if b > 1 and entries[0][0].shape[0] == b:
            return _split_batched(entries[0], b)
        return entries * b
    return None


def pair_samples(latents, conditioning, *, node: str | None = None,
                 inputs: tuple[str, str] = ("latents", "conditioning")) -> list[tuple[torch.Tensor, list]]:
    """Per-sample ``(latent [1, C, H, W], conditioning entry)`` pairs from ComfyUI values.

    ``latents``: one LATENT dict or a list of them (Make / Load Training Dataset: one ``[1, C, H, W]`` per image;
    Resolution Bucket: one ``[B_i, C, H_i, W_i]`` per bucket). ``conditioning``: one CONDITIONING or a list, paired
    element by element with the latents (each one entry per sample, or one entry for all its samples, or one
    batched entry), or a single one for every sample (one entry for all, or one entry per sample in order)."""
    in_l, in_c = inputs
    lat_list = [latents] if isinstance(latents, dict) else list(latents or [])
    if not lat_list:
        raise DistillError("no latents", LATENT_SOURCES, node=node, input_name=in_l)
    tensors = []
    for lat in lat_list:
        s = lat.get("samples") if isinstance(lat, dict) else None
        if not isinstance(s, torch.Tensor) or s.ndim != 4 or s.shape[0] == 0:
            raise DistillError("this is not a batch of image latents ([B, C, H, W] samples)", LATENT_SOURCES,
                               node=node, input_name=in_l)
        tensors.append(s)
    if conditioning is None or (isinstance(conditioning, (list, tuple)) and not conditioning):
        raise DistillError("the conditioning is empty", COND_SOURCES, node=node, input_name=in_c)
    conds = [conditioning] if all(_is_entry(e) for e in conditioning) else list(conditioning)
    sizes = [t.shape[0] for t in tensors]
    per_sample: list = []
    if len(conds) == len(tensors):
        for i, (cond, b) in enumerate(zip(conds, sizes)):
            got = _for_batch(_entries(cond, node=node, input_name=in_c), b)
            if got is None:
                raise DistillError(f"conditioning {i} has {len(cond)} entries for {b} latents",
                                   "give one caption per latent (in the latents' order) or one for all",
                                   node=node, input_name=in_c)
            per_sample += got
    elif len(conds) == 1:
        per_sample = _for_batch(_entries(conds[0], node=node, input_name=in_c), sum(sizes))
        if per_sample is None:
            raise DistillError(f"{len(conds[0])} conditionings for {sum(sizes)} latents",
                               "give one caption per latent (in the latents' order) or one for all", node=node,
                               input_name=in_c)
    else:
        raise DistillError(f"{len(conds)} conditionings for {len(tensors)} latent batches ({sum(sizes)} latents)",
                           "connect the latents and conditioning lists of the same Make / Load Training Dataset "
                           "or Resolution Bucket node, or one conditioning for all", node=node, input_name=in_c)
    samples = [t[i:i + 1] for t in tensors for i in range(t.shape[0])]
    return list(zip(samples, per_sample))


def make_kd_data(model, latents, conditioning, *, node: str | None = None,
                 inputs: tuple[str, str] = ("latents", "conditioning")) -> KDData:
    """The engine's in-memory data from ComfyUI values (see :func:`pair_samples`), every sample through
    :func:`prepare_sample`'s conversion. A conditioning shared by samples of one size is converted once; when it
    is shared by all, the data hold it once. Non-finite values are refused by input name."""
    pairs = pair_samples(latents, conditioning, node=node, inputs=inputs)
    xs, keys, done = [], [], {}
    for lat, entry in pairs:
        x0 = latent_in(model, lat)
        key = (id(entry[0]), id(entry[1]), tuple(x0.shape[-2:]))
        if key not in done:
            done[key] = conditioning_in(model, entry, x0, node=node, input_name=inputs[1])
        xs.append(x0)
        keys.append(key)
    if len(done) == 1:
        ctx, y = next(iter(done.values()))
        contexts, ys = [ctx], (None if y is None else y[None])
    else:
        contexts = [done[k][0] for k in keys]
        ys = None if done[keys[0]][1] is None else torch.stack([done[k][1] for k in keys])
    latents_in = torch.stack(xs) if len({x.shape for x in xs}) == 1 else xs
    return KDData(latents_in, contexts, ys, node=node, inputs=inputs)
