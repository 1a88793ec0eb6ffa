"""ComfyUI's saved training datasets (``SaveTrainingDataset``: ``shard_NNNN.pkl`` files plus ``metadata.json``
under ``models/datasets``) streamed shard by shard as a data source of the engine (see ``data.py``).

A shard holds ``{"latents": [{"samples": [1, C, H, W]}, ...], "conditioning": [[[cond, {...}]], ...]}`` (one
entry per sample, as ``MakeTrainingDataset`` makes them). Shards are read with torch's weights-only loader,
memory-mapped: opening a dataset reads every shard's shapes but none of its values, a batch reads the shards
its samples are in (a small cache keeps the last few), so a process holds at most a few shards whatever the
dataset's size, and under ``torchrun`` each rank reads only the shards of its own samples. A shard that needs
more than the weights-only loader allows is refused with its file named.

Turning a ComfyUI sample into the UNet's inputs (``process_latent_in``, the model's ``extra_conds`` for SDXL's
pooled and size conditioning) is the host's business: the caller passes ``prepare(latent [1, C, H, W],
conditioning) -> (x0 [C, H, W], context [L, D], y [adm] or None)``.

Non-finite values in a shard are not looked for up front (that would read the whole dataset): a batch that
holds any makes a non-finite loss, and the engine skips that step (and stops after several in a row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable

import torch

from .data import lcm_of
from .errors import DistillError

log = logging.getLogger("distilled_unets")

SHARD = re.compile(r"^shard_(\d+)\.pkl$")
Prepare = Callable[[torch.Tensor, list], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class DatasetError(DistillError):
    """A training-dataset folder or shard that cannot be read."""


def shard_files(folder: str) -> list[str]:
    """The shard files of a ``SaveTrainingDataset`` folder, in order."""
    if not os.path.isdir(folder):
        raise DatasetError("the dataset folder does not exist", "pick a folder written by Save Training Dataset",
                           path=folder)
    names = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := SHARD.match(f)))
    if not names:
        raise DatasetError("the folder holds no shard_NNNN.pkl files", "pick a folder written by Save Training "
                           "Dataset (ComfyUI 0.33 or newer)", path=folder)
    return [os.path.join(folder, f) for _, f in names]


def load_shard(path: str, *, mmap: bool = True) -> tuple[list, list]:
    """(latents, conditioning) of one shard, through the weights-only loader (never a full unpickler)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise DatasetError(f"the shard needs more than the weights-only loader allows ({str(e).splitlines()[0]})",
                           "remake the dataset with Save Training Dataset; never load shards of unknown origin "
                           "with a full unpickler", path=path) from e
    except Exception as e:  # torch's readers raise whatever a damaged archive or pickle makes them meet
        if mmap and isinstance(e, RuntimeError) and "mmap" in str(e):  # an old (non-zip) torch.save format
            return load_shard(path, mmap=False)                          # cannot be memory-mapped
        raise DatasetError(f"the shard cannot be read ({type(e).__name__}: {str(e)[:160]})",
                           "remake the dataset (the file is truncated or not a torch.save file)", path=path) from e
    ok = isinstance(data, dict) and isinstance(data.get("latents"), list) and \
        isinstance(data.get("conditioning"), list) and len(data["latents"]) == len(data["conditioning"])
    if not ok:
        raise DatasetError("the shard is not a Save Training Dataset shard (latents and conditioning lists of "
                           "equal length)", "pick a folder written by Save Training Dataset", path=path)
    return data["latents"], data["conditioning"]


def _latent_tensor(entry, path: str) -> torch.Tensor:
    t = entry.get("samples") if isinstance(entry, dict) else entry
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4) or (t.ndim == 4 and t.shape[0] != 1) \
            or not t.is_floating_point() or min(t.shape[-3:]) < 1:
        raise DatasetError("a latent in the shard is not one [1, C, H, W] sample of numbers", "remake the dataset "
                           "with Make Training Dataset", path=path)
    return t if t.ndim == 4 else t[None]


def _cond_tokens(cond, path: str) -> tuple[int, int]:
    """(tokens, width) of one sample's conditioning: one CLIP Text Encode output, ``[[cond [1, L, D], {...}]]``
    (or its one entry ``[cond, {...}]``), as Make Training Dataset stores it."""
    def entry(x) -> bool:
        return isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], torch.Tensor) and \
            isinstance(x[1], dict)

    e = cond if entry(cond) else cond[0] if isinstance(cond, (list, tuple)) and len(cond) == 1 else None
    c = e[0] if entry(e) else None
    if c is None or c.ndim not in (2, 3) or (c.ndim == 3 and c.shape[0] != 1) or not c.is_floating_point() \
            or min(c.shape[-2:]) < 1:
        raise DatasetError("a conditioning in the shard is not one CLIP Text Encode output ([[tensor [1, L, D], "
                           "{...}]])", "remake the dataset with Make Training Dataset", path=path)
    return int(c.shape[-2]), int(c.shape[-1])


class ShardedDataset:
    """A ``SaveTrainingDataset`` folder as a streaming data source (the engine's data protocol)."""

    def __init__(self, folder: str, prepare: Prepare, *, cache_shards: int = 2):
        self.folder = os.path.abspath(folder)
        self.files = shard_files(self.folder)
        self.prepare = prepare
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, tuple[list, list]] = OrderedDict()
        self._where: list[tuple[int, int]] = []   # global index -> (shard, position)
        self._shapes: list[tuple[int, ...]] = []
        tokens, width, channels = 0, None, None
        for s, path in enumerate(self.files):
            lats, conds = load_shard(path)
            for i, (lat, cond) in enumerate(zip(lats, conds)):
                self._shapes.append(tuple(_latent_tensor(lat, path).shape[1:]))
                n, d = _cond_tokens(cond, path)
                tokens, width = max(tokens, n), d if width is None else width
                channels = self._shapes[-1][0] if channels is None else channels
                if (d, self._shapes[-1][0]) != (width, channels):  # one batch stacks them: one width, one C
                    raise DatasetError(f"sample {i} of the shard has {self._shapes[-1][0]} latent channels and "
                                       f"conditioning width {d}, the first sample {channels} and {width}",
                                       "make the whole dataset with one VAE and one CLIP", path=path)
                self._where.append((s, i))
        if not self._where:
            raise DatasetError("the dataset has no samples", "make the dataset from at least one image",
                           path=self.folder)
        meta = os.path.join(self.folder, "metadata.json")
        if os.path.isfile(meta):
            try:
                with open(meta, encoding="utf-8") as f:
                    declared = int(json.load(f).get("num_samples", len(self._where)))
            except (ValueError, OSError, AttributeError, TypeError, OverflowError, RecursionError):
                declared = len(self._where)
            if declared != len(self._where):
                log.warning("dataset %s: metadata.json says %d samples, the shards hold %d (using the shards)",
                            self.folder, declared, len(self._where))
        x0, ctx, y = self._sample(0)
        self.channels = int(x0.shape[0])
        self.context_dim = int(ctx.shape[-1])
        self.max_tokens = max(tokens, int(ctx.shape[0]))
        self.has_y = y is not None
        log.info("dataset %s: %d samples in %d shards, %d latent size(s)", self.folder, len(self), len(self.files),
                 len(set(self._shapes)))

    def __len__(self) -> int:
        return len(self._where)

    def buckets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        out: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self._shapes):
            out.setdefault(s, []).append(i)
        return list(out.items())

    def _shard(self, s: int) -> tuple[list, list]:
        if s in self._cache:
            self._cache.move_to_end(s)
        else:
            self._cache[s] = load_shard(self.files[s])
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return self._cache[s]

    def _sample(self, i: int):
        s, pos = self._where[i]
        lats, conds = self._shard(s)
        try:
            return self.prepare(_latent_tensor(lats[pos], self.files[s]).float(), conds[pos])
        except DistillError as e:  # what the host's conversion refuses: name the shard
            e.path = e.path or self.files[s]
            raise

    def batch(self, idx: torch.Tensor):
        """(x0, context, y) of samples ``idx`` as new CPU tensors (only their shards are read)."""
        order = sorted(range(len(idx)), key=lambda j: self._where[int(idx[j])])  # shard by shard
        got = [None] * len(idx)
        for j in order:
            got[j] = self._sample(int(idx[j]))
        x0 = torch.stack([g[0].float() for g in got]).clone()
        n = lcm_of(g[1].shape[0] for g in got)
        ctx = torch.stack([g[1].float().repeat(n // g[1].shape[0], 1) for g in got]).clone()
        y = torch.stack([g[2].float().reshape(-1) for g in got]).clone() if self.has_y else None
        return x0, ctx, y

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}".encode())
        h.update(repr((len(self), sorted(set(self._shapes)))).encode())
        return h.hexdigest()

    def describe(self) -> str:
        sizes = sorted(set(self._shapes), key=lambda s: s[-2] * s[-1])
        return (f"{len(self)} samples in {len(self.files)} shards ({os.path.basename(self.folder)}), latents "
                + ", ".join(f"{s[-1] * 8}x{s[-2] * 8}" for s in sizes))
