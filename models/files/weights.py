"""Finding and checking weight files before anything is loaded.

* :func:`inspect_safetensors` reads only the header and proves the file is whole: every tensor's
  byte range lies inside the file and the data section ends exactly where the last tensor does.
  A truncated or corrupt download fails here with a :class:`WeightFileError`, before any tensor
  is read or any model is built.
* :func:`resolve_unet_source` turns what a user picked (a single file, a diffusers ``unet/``
  folder, one shard of a sharded folder) into the list of files to read plus the folder's
  ``config.json``, and refuses half-downloaded folders with an :class:`IncompleteModelError`.
* :func:`read_shapes` gives tensor names and shapes without reading tensor data (safetensors), or
  from a weights-only ``torch.load`` (``.ckpt``/``.pt``/``.bin``); pickled code is refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

from ..errors import IncompleteModelError, WeightFileError
from ..structure.topology import whole
from . import atomic

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXT = SAFETENSORS_EXT + PICKLE_EXT
PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".tmp", ".download", ".crdownload", ".aria2")
DIFFUSERS_NAMES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class Source:
    """What to read for one UNet: its weight files and, for a diffusers folder, its config."""

    files: list[str]
    config: dict | None = None
    folder: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder or self.files[0]


def inspect_safetensors(path: str) -> tuple[dict, dict]:
    """Header of a safetensors file -> ({name: (dtype, shape)}, metadata), with integrity checks."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError("the file is shorter than a safetensors header (empty or cut off)",
                                      "download the file again", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > size - 8:
                raise WeightFileError("the safetensors header length is impossible; the file is corrupt or "
                                      "not a safetensors file", "download the file again", path=path)
            raw = f.read(n)
    except OSError as e:
        raise WeightFileError(f"the file cannot be read ({e.strerror or e})", "check that it exists and is readable",
                              path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightFileError("the safetensors header is not valid JSON; the file is corrupt",
                              "download the file again", path=path) from e
    if not isinstance(header, dict):
        raise WeightFileError("the safetensors header is not a table of tensors", "download the file again", path=path)
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WeightFileError("the safetensors metadata is not a table of strings; the file is corrupt",
                              "download the file again", path=path)
    data_len = size - 8 - n
    shapes, spans = {}, []
    for name, info in header.items():
        dtype, shape, offsets = _entry(name, info, path)
        a, b = offsets
        want = math.prod(shape) * _DTYPE_BYTES[dtype]
        if b - a != want:
            raise WeightFileError(f"tensor '{name}' claims {b - a} bytes but {dtype}{list(shape)} needs {want}",
                                  "download the file again", path=path)
        if b > data_len:
            raise WeightFileError(
                f"the file is truncated: tensor '{name}' ends at byte {b} of a {data_len}-byte data section "
                f"({size} bytes on disk)", "the download was cut off; download the file again", path=path)
        shapes[name] = (dtype, shape)
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):  # the data section is covered exactly: no overlap, no hole
        if a != end:
            raise WeightFileError(f"tensor '{name}' starts at byte {a} of the data section, where "
                                  + ("another tensor ends at" if a < end else "a gap follows the tensors before it, at")
                                  + f" byte {end}; the file is corrupt", "download the file again", path=path)
        end = b
    if end != data_len:
        raise WeightFileError(f"the data section is {data_len} bytes but the tensors end at byte {end}; the file "
                              "is corrupt", "download the file again", path=path)
    return shapes, meta


def _entry(name: str, info, path: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (start, end)) of one header entry, each checked for its type and range."""
    def short(v) -> str:
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."

    def bad(what: str) -> WeightFileError:
        return WeightFileError(f"tensor '{name}' has a malformed header entry ({what})", "download the file again",
                               path=path)

    if not isinstance(info, dict):
        raise bad("not a table")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise bad(f"dtype {short(dtype)} is none this loader reads: {', '.join(_DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        raise bad(f"shape {short(shape)} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets) \
            or offsets[1] < offsets[0]:
        raise bad(f"data_offsets {short(offsets)} is not a [start, end] byte range")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _torch_load(path: str):
    import pickle

    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightFileError("the pickled file contains code or objects that weights-only loading refuses; this "
                              "pack never runs pickled code",
                              "get the .safetensors version of the model (or convert it in a trusted "
                              "environment)", path=path) from e
    except Exception as e:  # torch's readers raise whatever a damaged archive or pickle makes them meet
        raise WeightFileError(f"the file cannot be read as torch weights ({type(e).__name__}: {str(e)[:120]})",
                              "download the file again, preferably the .safetensors version", path=path) from e
    for k in ("state_dict", "module", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(k), dict) and len(sd) < 8:
            sd = sd[k]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightFileError("the file does not hold a plain table of tensors", "use a .safetensors file",
                              path=path)
    return sd


def read_shapes(path: str) -> tuple[dict, dict]:
    """({name: shape}, metadata) of one weight file, reading no tensor data for safetensors."""
    low = path.lower()
    if low.endswith(PARTIAL_SUFFIXES):
        raise IncompleteModelError("this is an unfinished download", "wait for the download to finish, or restart it",
                                   path=path)
    if low.endswith(SAFETENSORS_EXT):
        header, meta = inspect_safetensors(path)
        return {k: v[1] for k, v in header.items()}, meta
    if low.endswith(PICKLE_EXT):
        sd = _torch_load(path)
        return {k: tuple(v.shape) for k, v in sd.items()}, {}
    raise WeightFileError(f"'{os.path.splitext(path)[1]}' is not a weight file type this loader reads",
                          "use a .safetensors file (or .ckpt/.pt/.bin, loaded weights-only)", path=path)


def read_tensors(path: str, names) -> dict:
    """The tensors ``names`` of one weight file, read weights-only: from a safetensors file only those (after the
    header checks of :func:`inspect_safetensors`), from a ``.ckpt``/``.pt``/``.bin`` by a weights-only
    ``torch.load`` of the whole file. A name the file lacks is left out. Raises WeightFileError naming the file."""
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        from safetensors import safe_open

        header, _ = inspect_safetensors(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in names if k in header}
        except Exception as e:  # the header was checked: only a file changed since, or unreadable, gets here
            raise WeightFileError(f"the file cannot be read ({type(e).__name__}: {str(e)[:120]})",
                                  "download the file again", path=path) from e
    if low.endswith(PICKLE_EXT):
        sd = _torch_load(path)
        return {k: sd[k] for k in names if k in sd}
    raise WeightFileError(f"'{os.path.splitext(path)[1]}' is not a weight file type this loader reads",
                          "use a .safetensors file (or .ckpt/.pt/.bin, loaded weights-only)", path=path)


def _folder_source(folder: str) -> Source:
    names = set(os.listdir(folder))
    partial = sorted(n for n in names if n.lower().endswith(PARTIAL_SUFFIXES))
    config = None
    if "config.json" in names:
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
            raise IncompleteModelError("config.json in the folder is unreadable or cut off",
                                       "download the folder again", path=folder) from e
        if not isinstance(config, dict):
            raise IncompleteModelError("config.json in the folder is not a model config (a JSON object)",
                                       "download the folder again", path=folder)
    for idx_name in ("diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.fp16.safetensors.index.json"):
        if idx_name in names:
            try:
                with open(os.path.join(folder, idx_name), encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                shards = sorted(set(weight_map.values()))
                if not all(isinstance(s, str) for s in shards):
                    raise TypeError("a shard name is not a string")
            except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
                raise IncompleteModelError(f"{idx_name} is unreadable or not a weight index",
                                           "download the folder again", path=folder) from e
            missing = [s for s in shards if s not in names]
            if missing:
                raise IncompleteModelError(
                    f"{len(missing)} of {len(shards)} weight shards are missing (e.g. {missing[0]}); the download "
                    "is incomplete", "finish downloading every shard listed in the index", path=folder)
            return Source([os.path.join(folder, s) for s in shards], config, folder)
    for n in DIFFUSERS_NAMES:
        if n in names:
            return Source([os.path.join(folder, n)], config, folder)
    singles = sorted(n for n in names if n.lower().endswith(WEIGHT_EXT))
    if len(singles) == 1:
        return Source([os.path.join(folder, singles[0])], config, folder)
    if partial:
        raise IncompleteModelError(f"the folder holds an unfinished download ({partial[0]})",
                                   "wait for the download to finish, or restart it", path=folder)
    if not names:
        raise IncompleteModelError("the folder is empty", "download the model's unet/ folder into it", path=folder)
    if "unet" in names and os.path.isdir(os.path.join(folder, "unet")):
        return _folder_source(os.path.join(folder, "unet"))
    raise IncompleteModelError(
        "the folder has no UNet weights (expected diffusion_pytorch_model.safetensors"
        + (" next to config.json" if config is not None else "") + ")",
        "download the weights file of the model's unet/ folder (the download is incomplete)", path=folder)


def resolve_unet_source(path: str) -> Source:
    """What to read for the UNet the user picked: a file, a folder, or one file inside a folder."""
    if os.path.isdir(path):
        return _folder_source(path)
    if not os.path.exists(path):
        raise WeightFileError("the file does not exist", "refresh the node (R) and pick a file that exists", path=path)
    base = os.path.basename(path)
    folder = os.path.dirname(path)
    if base.startswith("diffusion_pytorch_model") or (
            os.path.exists(os.path.join(folder, "config.json")) and base.endswith(WEIGHT_EXT)
            and any(os.path.exists(os.path.join(folder, n + ".index.json")) for n in
                    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))):
        src = _folder_source(folder)
        if path in src.files or base.startswith("diffusion_pytorch_model"):
            return src
    if os.path.getsize(path) == 0:
        raise WeightFileError("the file is empty (0 bytes)", "download it again", path=path)
    return Source([path])


def source_shapes(src: Source) -> tuple[dict, dict]:
    """Merged ({name: shape}, metadata) of every file of ``src``."""
    shapes, meta = {}, {}
    for f in src.files:
        s, m = read_shapes(f)
        shapes.update(s)
        meta.update(m or {})
    if not shapes:
        raise WeightFileError("the file holds no tensors", "download the file again", path=src.name)
    return shapes, meta


def save_new(tensors: dict, folder: str, name_for: Callable[[int], str], metadata: dict | None = None,
             start: int = 0, tries: int = 100_000) -> str:
    """Write ``tensors`` as a safetensors file named ``name_for(n)`` for the first free ``n >= start``, never
    replacing a file and never showing a half-written one under that name: written (and synced) under a
    temporary name first, then hard-linked to the free name (or, where the file system has no hard links, the
    name is claimed exclusively and the file moved over the claim). Returns the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tmp = atomic.partial_path(os.path.join(folder, name_for(start)))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        for n in range(start, start + tries):
            final = os.path.join(folder, name_for(n))
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                continue
            except OSError:  # no hard links here: claim the name exclusively, then move the file over the claim
                try:
                    fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    continue
                os.close(fd)
                os.replace(tmp, final)
                return final
        raise FileExistsError(f"no free file name like {name_for(start)} in {folder}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
