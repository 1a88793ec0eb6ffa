"""ComfyUI's saved training datasets (``SaveTrainingDataset``: ``shard_NNNN.pkl`` files plus ``metadata.json``
under ``models/datasets``) streamed shard by shard as a data source of the engine (see ``data.py``).

A shard holds ``{"latents": [{"samples": [1, C, H, W]}, ...], "conditioning": [[[cond, {...}]], ...]}`` (one
entry per sample, as ``MakeTrainingDataset`` makes them). Shards are parsed with torch's weights-only loader,
memory-mapped, once, when the dataset is opened: that reads every shard's structure but none of its values, and
leaves a **sample index** (where each sample's tensors lie in its file: offset, shape, dtype; the small
non-tensor options of its conditioning). A batch then reads exactly the bytes of its samples, one ``readinto``
per tensor, without parsing a shard again: training draws samples in a random order over the whole dataset, so
a batch of 64 touches up to 64 shards, and re-parsing a 1000-sample shard (Save Training Dataset's default
size) costs about 0.4 s on a 2-core CPU. At most ``max_open`` shard files are open at once per process
(default 2); no shard is ever held whole; under ``torchrun`` each rank reads only its own samples. The index
costs a few hundred bytes per sample. A shard the index cannot describe (an old non-zip ``torch.save`` format,
non-contiguous tensors, a conditioning with several entries or nested tensors) is read the old way, whole,
memory-mapped, through a cache of ``max_open`` parsed shards. A shard that needs more than the weights-only
loader allows is refused with its file named.

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
import struct
import sys
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable

import torch

from .data import lcm_of
from .errors import DistillError
from .fingerprint import DigestCache, combined

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


class TensorRef:
    """Where one tensor of a shard lies in its file: byte offset, shape and dtype (contiguous)."""

    __slots__ = ("offset", "shape", "dtype")

    def __init__(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.offset, self.shape, self.dtype = offset, shape, dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _record_offsets(path: str) -> tuple[list[int], str] | None:
    """(file offsets of the storage records of a ``torch.save`` zip file, its byte order), from the zip's local
    headers; None for anything else (an old non-zip format)."""
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            offsets, order = [], None
            for info in z.infolist():
                parts = info.filename.split("/")
                if len(parts) == 2 and parts[1] == "byteorder":
                    order = z.read(info).decode("ascii", "replace").strip()
                if len(parts) != 3 or parts[1] != "data" or info.compress_type != zipfile.ZIP_STORED:
                    continue
                f.seek(info.header_offset)
                head = f.read(30)
                if len(head) != 30 or head[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                offsets.append(info.header_offset + 30 + name_len + extra_len)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return sorted(offsets), order or sys.byteorder


def _index_shard(path: str, lats: list, conds: list) -> list | None:
    """Per sample ``(latent ref, cond ref, ((option, value or TensorRef), ...))`` for a shard loaded memory-mapped
    (every tensor then points into one mapping of the file), or None when the shard cannot be described so."""
    found = _record_offsets(path)
    if found is None:
        return None
    offsets, order = found
    if order != sys.byteorder or not offsets:
        return None
    samples = []
    tensors = []
    for lat, cond in zip(lats, conds):
        t = lat.get("samples") if isinstance(lat, dict) else lat
        if not isinstance(cond, list) or len(cond) != 1 or not isinstance(cond[0], (list, tuple)) or \
                len(cond[0]) != 2 or not isinstance(cond[0][0], torch.Tensor) or not isinstance(cond[0][1], dict) \
                or not isinstance(t, torch.Tensor):
            return None
        opts = []
        for k, v in cond[0][1].items():
            if isinstance(v, torch.Tensor):
                tensors.append(v)
            elif isinstance(v, (list, tuple, dict, set)) or hasattr(v, "__dict__"):
                return None  # nested values (and tensors in them): read the shard whole
            opts.append((k, v))
        tensors += [t, cond[0][0]]
        samples.append((t, cond[0][0], opts))
    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        return None
    ptrs = sorted({t.untyped_storage().data_ptr() for t in tensors})
    base = ptrs[0] - offsets[0]
    known = set(offsets)
    if any(p - base not in known for p in ptrs):
        return None  # not one mapping of the file (the loader did not memory-map it)
    shapes: dict = {}

    def ref(t: torch.Tensor) -> TensorRef:
        shape = shapes.setdefault(tuple(t.shape), tuple(t.shape))  # one tuple per distinct shape
        return TensorRef(t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size(), shape,
                         t.dtype)

    return [(ref(t), ref(c), tuple((k, ref(v) if isinstance(v, torch.Tensor) else v) for k, v in opts))
            for t, c, opts in samples]


class ShardedDataset:
    """A ``SaveTrainingDataset`` folder as a streaming data source (the engine's data protocol), read sample by
    sample through its index (see the module docstring). ``max_open``: shard files open at once (and parsed
    shards cached, for shards read whole). Safe to read from a prefetch thread while the main thread trains."""

    def __init__(self, folder: str, prepare: Prepare, *, max_open: int = 2, index: bool = True,
                 cache_shards: int | None = None):
        self.folder = os.path.abspath(folder)
        self.files = shard_files(self.folder)
        self.prepare = prepare
        self.max_open = max(1, cache_shards if cache_shards is not None else max_open)
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, tuple[list, list]] = OrderedDict()   # parsed shards (shards read whole)
        self._open: OrderedDict[int, object] = OrderedDict()               # open files (indexed shards)
        self._where: list[tuple[int, int]] = []   # global index -> (shard, position)
        self._shapes: list[tuple[int, ...]] = []
        self._index: list[list | None] = []       # per shard: per-sample refs, or None (read whole)
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
            self._index.append(_index_shard(path, lats, conds) if index else None)
            del lats, conds
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
        whole = sum(ix is None for ix in self._index)
        log.info("dataset %s: %d samples in %d shards, %d latent size(s); %s; at most %d shard file(s) open at once",
                 self.folder, len(self), len(self.files), len(set(self._shapes)),
                 "every shard indexed (read sample by sample)" if not whole else
                 f"{whole} shard(s) read whole (no index), the rest sample by sample", self.max_open)

    @property
    def indexed(self) -> bool:
        """Whether every shard is read sample by sample (through the index)."""
        return all(ix is not None for ix in self._index)

    def __len__(self) -> int:
        return len(self._where)

    def buckets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        out: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self._shapes):
            out.setdefault(s, []).append(i)
        return list(out.items())

    def _shard(self, s: int) -> tuple[list, list]:
        with self._lock:
            if s in self._cache:
                self._cache.move_to_end(s)
            else:
                self._cache[s] = load_shard(self.files[s])
                while len(self._cache) > self.max_open:
                    self._cache.popitem(last=False)
            return self._cache[s]

    def _file(self, s: int):
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        try:
            f = open(self.files[s], "rb", buffering=0)
        except OSError as e:
            raise DatasetError(f"the shard cannot be opened ({e.strerror})", "restore the dataset folder (a shard "
                               "was moved or deleted after the dataset was opened)", path=self.files[s]) from e
        self._open[s] = f
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    def _read(self, s: int, ref: TensorRef) -> torch.Tensor:
        buf = bytearray(ref.nbytes)
        with self._lock:
            f = self._file(s)
            f.seek(ref.offset)
            got = f.readinto(buf) if buf else 0
        if got != len(buf):
            raise DatasetError("the shard is shorter than when the dataset was opened", "restore the dataset "
                               "folder (a shard was rewritten or truncated while training)", path=self.files[s])
        t = torch.frombuffer(buf, dtype=ref.dtype) if buf else torch.empty(0, dtype=ref.dtype)
        return t.reshape(ref.shape)

    def _sample(self, i: int):
        s, pos = self._where[i]
        ix = self._index[s]
        try:
            if ix is None:
                lats, conds = self._shard(s)
                return self.prepare(_latent_tensor(lats[pos], self.files[s]).float(), conds[pos])
            lat_ref, cond_ref, opts = ix[pos]
            lat = self._read(s, lat_ref)
            cond = [[self._read(s, cond_ref),
                     {k: self._read(s, v) if isinstance(v, TensorRef) else v for k, v in opts}]]
            return self.prepare((lat if lat.ndim == 4 else lat[None]).float(), cond)
        except DistillError as e:  # what the host's conversion refuses: name the shard
            e.path = e.path or self.files[s]
            raise

    def batch(self, idx: torch.Tensor):
        """(x0, context, y) of samples ``idx`` as new CPU tensors (only their bytes are read)."""
        order = sorted(range(len(idx)), key=lambda j: self._where[int(idx[j])])  # shard by shard
        got = [None] * len(idx)
        for j in order:
            got[j] = self._sample(int(idx[j]))
        x0 = torch.stack([g[0].float() for g in got]).clone()
        n = lcm_of(g[1].shape[0] for g in got)
        ctx = torch.stack([g[1].float().repeat(n // g[1].shape[0], 1) for g in got]).clone()
        y = torch.stack([g[2].float().reshape(-1) for g in got]).clone() if self.has_y else None
        return x0, ctx, y

    def shard_digests(self, cache_dir: str | None = None, *, save: bool = True) -> dict[str, str]:
        """{shard file name: digest of its content}, computed once (``fingerprint.py``; the cache in
        ``cache_dir``, or the folder set as ``digest_cache_dir``, keeps them across runs; ``save`` False: the
        cache is written only by :meth:`save_digests`)."""
        if getattr(self, "_digests", None) is None:
            self._digest_cache = DigestCache(cache_dir or getattr(self, "digest_cache_dir", None))
            self._digests = self._digest_cache.digests(self.files)
            if save:
                self._digest_cache.save()
        return self._digests

    def save_digests(self) -> None:
        """Write the digest cache (when :meth:`shard_digests` computed digests with ``save`` False)."""
        if getattr(self, "_digest_cache", None) is not None:
            self._digest_cache.save()

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()
            self._cache.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to close
            pass

    def fingerprint(self) -> str:
        """The dataset's identity: every shard's content, and the samples' count and shapes."""
        return combined(self.shard_digests(), repr((len(self), sorted(set(self._shapes)))))

    def layout_fingerprint(self) -> str:
        """The identity checkpoints before content digests recorded: shard names and sizes, sample shapes."""
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
