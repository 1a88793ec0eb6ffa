"""Training samples and the order they are drawn in.

Data sources (duck-typed; :class:`KDData` in memory, the streaming dataset of ``datasets.py``):
``len(src)``, ``src.buckets()`` -> ``[(sample shape, [global indices])]`` (one bucket per latent shape: a
micro-batch never mixes shapes), ``src.batch(idx)`` -> ``(x0, context, y)`` as new CPU tensors,
``src.context_dim``, ``src.max_tokens``, ``src.has_y``, ``src.channels`` and ``src.fingerprint()``.

The order depends only on ``(seed, global micro-batch)``, never on the number of processes: a global
micro-batch of ``G = batch_size x world_size`` samples is drawn, rank ``r`` trains on its slice
``[r * batch_size, (r + 1) * batch_size)``, timesteps and noise are drawn for the whole ``G`` and sliced alike.
So 2 processes x batch 2 see exactly the samples, timesteps and noise of 1 process x batch 4, and a run
resumed from a checkpoint draws what the uninterrupted run drew.

Per bucket, samples come in a stream of epoch permutations (every sample once per epoch); with several
buckets, each global micro-batch picks its bucket at random, weighted by the bucket's size (as ComfyUI's
``TrainLoraNode`` does in bucket mode), and takes the next ``G`` samples of that bucket's stream.

Also here: a held-out split of any data source (:func:`split_heldout`: a fixed set of samples chosen by seed, never
trained on; :class:`Subset` is each side) and :class:`Prefetcher`, which prepares the next micro-batches in a
background thread while the step runs (the same draws, in the same order: only when they are read changes).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import DistillError


def lcm_of(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def check_finite(t: torch.Tensor, what: str, *, node: str | None = None, input_name: str | None = None,
                 path: str | None = None, fix: str | None = None) -> None:
    """Refuse non-finite values (NaN, inf) in training inputs, naming the input and the first bad sample."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise DistillError(f"{what} hold NaN or infinite values ({int(bad.sum())} of {bad.numel()} samples, the "
                           f"first is sample {first})",
                           fix or "remake them (an fp16 VAE can overflow: encode in fp32 or bf16) or leave those "
                           "samples out", node=node, input_name=input_name, path=path)


class KDData:
    """Training samples in memory: latents in the model's space (after ``process_latent_in``) with their
    conditioning.

    ``latents``: a ``[N, C, H, W]`` tensor, or a list of ``[C, H, W]`` / ``[1, C, H, W]`` tensors whose sizes may
    differ (resolution buckets). ``context``: one ``[L, D]`` tensor per sample (lengths may differ: they are
    repeated to a common length in a batch, which leaves cross-attention unchanged, as ComfyUI does), a
    ``[N, L, D]`` tensor, or one ``[L, D]`` / ``[1, L, D]`` tensor for all. ``y``: ``[N, adm]`` (SDXL) or one
    ``[adm]`` / ``[1, adm]`` for all, or None. Non-finite values are refused here, before any step.
    """

    def __init__(self, latents, context: Any, y: torch.Tensor | None = None, *, node: str | None = None,
                 inputs: tuple[str, str] = ("latents", "conditioning")):
        if isinstance(latents, torch.Tensor):
            lat = latents
            n = lat.shape[0]
            shapes = [tuple(lat.shape[1:])] * n
        else:
            lat = [x[0] if x.ndim == 4 and x.shape[0] == 1 else x for x in latents]
            if not lat or any(x.ndim != 3 for x in lat):
                raise DistillError("the latents are not a list of [C, H, W] samples", "give image latents",
                                   node=node, input_name=inputs[0])
            n = len(lat)
            shapes = [tuple(x.shape) for x in lat]
            if len(set(shapes)) == 1:
                lat = torch.stack(lat)
        self.latents = lat
        self._shapes = shapes
        ctx = context
        if isinstance(ctx, torch.Tensor):
            if ctx.ndim == 2:
                ctx = [ctx]
            elif ctx.ndim == 3:
                ctx = list(ctx.unbind(0))
            else:
                raise DistillError(f"conditioning has shape {tuple(ctx.shape)}", "give [tokens, width] per sample",
                                   node=node, input_name=inputs[1])
        ctx = [c[0] if c.ndim == 3 and c.shape[0] == 1 else c for c in ctx]
        if len(ctx) not in (1, n):
            raise DistillError(f"{len(ctx)} conditionings for {n} latents",
                               "give one conditioning per latent, or one for all", node=node, input_name=inputs[1])
        self._ctx = ctx
        if y is not None:
            y = y.reshape(-1, y.shape[-1])
            if y.shape[0] not in (1, n):
                raise DistillError(f"{y.shape[0]} pooled/size vectors for {n} latents",
                                   "give one per latent, or one for all", node=node, input_name=inputs[1])
        self._y = y
        for i, x in enumerate(lat if isinstance(lat, list) else [lat]):
            check_finite(x[None] if x.ndim == 3 else x, "the latents" if isinstance(lat, torch.Tensor)
                         else f"the latents (sample {i})", node=node, input_name=inputs[0])
        fix = "re-encode those captions (CLIP Text Encode) or leave those samples out"
        for c in ctx:
            check_finite(c[None], "the conditioning", node=node, input_name=inputs[1], fix=fix)
        if y is not None:
            check_finite(y, "the pooled/size conditioning", node=node, input_name=inputs[1], fix=fix)

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def channels(self) -> int:
        return self._shapes[0][0]

    @property
    def context_dim(self) -> int:
        return self._ctx[0].shape[-1]

    @property
    def max_tokens(self) -> int:
        return max(c.shape[0] for c in self._ctx)

    @property
    def has_y(self) -> bool:
        return self._y is not None

    def buckets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        out: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self._shapes):
            out.setdefault(s, []).append(i)
        return list(out.items())

    def _latent(self, i: int) -> torch.Tensor:
        return self.latents[i]

    def batch(self, idx: torch.Tensor):
        """(x0, context, y) for sample indices ``idx``, as new normal (non-inference) CPU tensors."""
        if isinstance(self.latents, torch.Tensor):
            x0 = self.latents[idx].float().clone()
        else:
            x0 = torch.stack([self.latents[int(i)] for i in idx]).float()
        cs = [self._ctx[int(i) if len(self._ctx) > 1 else 0] for i in idx]
        n = lcm_of(c.shape[0] for c in cs)
        ctx = torch.stack([c.repeat(n // c.shape[0], 1) for c in cs]).float().clone()
        y = None
        if self._y is not None:
            y = (self._y[idx] if self._y.shape[0] > 1 else self._y.expand(len(idx), -1)).float().clone()
        return x0, ctx, y

    def split_tail(self, k: int) -> tuple[KDData, KDData]:
        """(the first ``len - k`` samples, the last ``k``): held-out samples taken from the data."""
        n = len(self)
        ctx = self._ctx if len(self._ctx) == n else self._ctx * n
        y = None if self._y is None else (self._y if self._y.shape[0] == n else self._y.expand(n, -1))
        lat = self.latents
        head = KDData(lat[:n - k], ctx[:n - k], None if y is None else y[:n - k])
        tail = KDData(lat[n - k:], ctx[n - k:], None if y is None else y[n - k:])
        return head, tail

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        lat = self.latents if isinstance(self.latents, list) else [self.latents]
        h.update(repr((tuple(self._shapes[:1]), len(self), len(self._ctx))).encode())
        h.update(repr(round(float(sum(x.double().sum() for x in lat)), 6)).encode())
        h.update(repr(round(float(sum(c.double().sum() for c in self._ctx)), 6)).encode())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the order
# ------------------------------------------------------------------------------------------------

def step_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *parts)`` (per-step randomness independent of history)."""
    digest = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int, bucket: int = 0) -> torch.Tensor:
    parts = ("epoch", epoch) if bucket == 0 else ("epoch", epoch, "bucket", bucket)
    return torch.randperm(n, generator=step_generator(seed, *parts))


class BatchOrder:
    """Which bucket each global micro-batch comes from, and where in that bucket's stream it starts.

    One bucket: micro-batch ``k`` starts at ``k * G``. Several: a draw per micro-batch weighted by bucket
    size; the picks are replayed from the start once and then extended (a resumed run gets the same)."""

    def __init__(self, seed: int, sizes: list[int]):
        self.seed, self.sizes = seed, list(sizes)
        self.bucket_weights = torch.tensor(self.sizes, dtype=torch.float64)
        self._picks: list[int] = []
        self._counts: list[int] = []  # how many earlier picks of the same bucket, per micro-batch
        self._seen = [0] * len(self.sizes)

    def locate(self, k: int) -> tuple[int, int]:
        """(bucket, how many micro-batches of that bucket came before micro-batch ``k``)."""
        if len(self.sizes) == 1:
            return 0, k
        while len(self._picks) <= k:
            j = len(self._picks)
            b = int(torch.multinomial(self.bucket_weights, 1, generator=step_generator(self.seed, "bucket", j)))
            self._picks.append(b)
            self._counts.append(self._seen[b])
            self._seen[b] += 1
        return self._picks[k], self._counts[k]


def draw_batch(seed: int, step: int, micro: int, *, n_data: int | None = None, batch_size: int, grad_accum: int,
               num_timesteps: int, sample_shape: tuple[int, ...] | None = None, rank: int = 0, world_size: int = 1,
               buckets: list[tuple[tuple[int, ...], list[int]]] | None = None, order: BatchOrder | None = None):
    """The random draws of this rank's share of one global micro-batch, from ``(seed, step, micro)`` alone:
    sample indices (every sample of a bucket once per epoch, in an order seeded by the epoch), timesteps
    uniform over ``num_timesteps`` (BK-SDM's ``torch.randint(0, num_train_timesteps)``) and Gaussian noise.

    Give ``n_data`` and ``sample_shape`` for one bucket of samples ``0..n_data-1``, or ``buckets`` (and the
    run's :class:`BatchOrder`) for several."""
    if buckets is None:
        buckets = [(tuple(sample_shape), list(range(n_data)))]
    if order is None:
        order = BatchOrder(seed, [len(ix) for _, ix in buckets])
    g = batch_size * world_size
    k = step * grad_accum + micro
    b, before = order.locate(k)
    shape, members = buckets[b]
    n = len(members)
    start = before * g
    idx = []
    for p in range(start + rank * batch_size, start + (rank + 1) * batch_size):
        epoch, pos = divmod(p, n)
        idx.append(members[int(_epoch_order(seed, epoch, n, b)[pos])])
    gen = step_generator(seed, "step", step, micro)
    t = torch.randint(0, num_timesteps, (g,), generator=gen)
    noise = torch.randn((g, *shape), generator=gen, dtype=torch.float32)
    sl = slice(rank * batch_size, (rank + 1) * batch_size)
    return torch.tensor(idx, dtype=torch.long), t[sl].clone(), noise[sl].clone()


# ------------------------------------------------------------------------------------------------
# a held-out split of a data source
# ------------------------------------------------------------------------------------------------

#: the most samples a held-out split takes, whatever the fraction: the held-out batches (teacher outputs
#: included) stay on the device for the whole run, and 128 samples x ``heldout_timesteps`` measure the error
#: well enough
HELDOUT_MAX = 128


def heldout_indices(n: int, fraction: float, seed: int = 0, *, limit: int = HELDOUT_MAX) -> list[int]:
    """The samples (of ``0..n-1``) a held-out split of ``fraction`` keeps out of training, sorted: ``round(fraction
    x n)`` of them, at least 1 when ``fraction > 0`` and at most ``limit`` and ``n - 1``, chosen by a generator
    seeded ``(seed, "heldout split")`` alone. So they depend on the data's size, the fraction and the seed, never
    on the training draws, the number of processes or where a run resumes."""
    if not 0 <= fraction < 1:
        raise DistillError(f"the held-out fraction is {fraction!r}", "give a fraction in [0, 1) (0 = none)",
                           input_name="heldout_fraction")
    if fraction == 0 or n < 2:
        return []
    k = min(max(1, round(fraction * n)), limit, n - 1)
    return sorted(torch.randperm(n, generator=step_generator(seed, "heldout split"))[:k].tolist())


class Subset:
    """Some samples of a data source, by their global indices (which :meth:`batch` keeps): the training or the
    held-out side of a split. Follows the engine's data protocol; its fingerprint is the source's with the split."""

    def __init__(self, source, keep, tag: str):
        self.source = source
        self._keep = sorted(int(i) for i in keep)
        self._tag = tag
        keep_set = set(self._keep)
        self._buckets = [(shape, [i for i in ix if i in keep_set]) for shape, ix in source.buckets()]
        self._buckets = [(shape, ix) for shape, ix in self._buckets if ix]
        self.channels, self.context_dim = source.channels, source.context_dim
        self.max_tokens, self.has_y = source.max_tokens, source.has_y

    def __len__(self) -> int:
        return len(self._keep)

    @property
    def indices(self) -> list[int]:
        return list(self._keep)

    def buckets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        return [(shape, list(ix)) for shape, ix in self._buckets]

    def batch(self, idx: torch.Tensor):
        return self.source.batch(idx)

    def fingerprint(self) -> str:
        return hashlib.blake2b(f"{self.source.fingerprint()}|{self._tag}".encode(), digest_size=8).hexdigest()

    def describe(self) -> str:
        what = self.source.describe() if hasattr(self.source, "describe") else f"{len(self.source)} samples"
        return f"{len(self)} of {what}"

    def __getattr__(self, name: str):
        """What a streamed source also has (AttributeError where the source has none, e.g. in memory): its shard
        files and their digests (``shard_digests``, ``save_digests``, ``close``: a split reads the same files) and
        ``layout_fingerprint`` (the identity checkpoints before content digests recorded) with the split: such a
        checkpoint was trained on the whole source, so a split of it is other data."""
        if name in ("shard_digests", "save_digests", "close"):
            return getattr(self.source, name)
        if name == "layout_fingerprint":
            whole = getattr(self.source, name)
            return lambda: hashlib.blake2b(f"{whole()}|{self._tag}".encode(), digest_size=8).hexdigest()
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def split_heldout(source, fraction: float, seed: int = 0):
    """(training side, held-out side or None, what was held out) of a data source: :func:`heldout_indices`."""
    held = heldout_indices(len(source), fraction, seed)
    if not held:
        why = "a fraction of 0" if fraction == 0 else f"only {len(source)} sample(s)"
        return source, None, f"none ({why}: nothing is held out)"
    tag = f"heldout {fraction!r} seed {seed}"
    out = set(held)
    train = Subset(source, [i for i in range(len(source)) if i not in out], f"train | {tag}")
    limit = " (the most a split takes)" if len(held) == HELDOUT_MAX and round(fraction * len(source)) > len(held) \
        else ""
    note = (f"{len(held)} of {len(source)} samples ({100 * len(held) / len(source):.2g} %{limit}), chosen by seed "
            f"{seed}: never trained on")
    return train, Subset(source, held, f"held | {tag}"), note


# ------------------------------------------------------------------------------------------------
# reading ahead
# ------------------------------------------------------------------------------------------------

class Prefetcher:
    """Prepares items ``produce(*key)`` for ``keys``, in order, in one background thread, at most ``depth`` ahead
    of :meth:`get` (``depth`` 0: made on demand, in the caller's thread). An error while producing is raised
    by the :meth:`get` that would have returned that item; :meth:`close` stops the thread.

    A thread rather than worker processes: reading a shard's bytes and the host's per-sample preparation release
    the GIL or are short, the prepared batch needs no copy between processes, the data source is shared with the
    run (one index, one bound on open files per process), and ``prepare`` (the teacher's model code) need not be
    pickled into other processes."""

    def __init__(self, produce: Callable, keys, depth: int = 2, *, name: str = "distilled_unets data"):
        import queue
        import threading

        self._produce, self._keys, self.depth = produce, iter(keys), max(0, int(depth))
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.depth))
        self._thread = None
        if self.depth:
            self._thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._thread.start()

    def _work(self) -> None:
        import queue

        for key in self._keys:
            if self._stop.is_set():
                return
            try:
                item = (key, self._produce(*key), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                item = (key, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, *key):
        """The item of ``key`` (the next key of the sequence)."""
        if self._thread is None:
            expected = next(self._keys, None)
            if expected is not None and tuple(expected) != key:
                raise RuntimeError(f"prefetch order: asked for {key}, the next is {tuple(expected)}")
            return self._produce(*key)
        import queue

        while True:
            try:
                got, item, err = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetch: nothing more to read (asked for {key})") from None
        if err is not None:
            raise err
        if tuple(got) != key:
            raise RuntimeError(f"prefetch order: asked for {key}, the next is {tuple(got)}")
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            import queue

            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None
