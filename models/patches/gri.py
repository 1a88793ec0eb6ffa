"""Global-regional interactive (GRI) attention on a token grid (A-SDM), host-free.

A-SDM names GRI attention but gives no reference code, so the pack defines it here:

* The token grid ``H x W`` is cut into windows of ``window x window`` tokens (regional part). Grids that
  are not a multiple of the window are padded up to one; padded key slots are masked out of the softmax
  and padded query rows are dropped, so any ``H, W`` works (13x10 with window 4 gives 4x3 windows).
  Windows may be offset by ``shift`` tokens (Swin-style shifted windows): the offset only moves the
  window borders (the grid is padded at the top/left), nothing wraps around, so no extra mask is needed.
* The whole grid's keys and values are average-pooled by a factor ``pool`` (global part; ragged edge
  cells average the tokens they really hold).
* Every query attends, in ONE softmax, to the keys of its own window and to all pooled keys, through a
  single batched ``torch.nn.functional.scaled_dot_product_attention`` call (windows are a batch axis,
  no Python loop over windows); the key-side bias below is passed as the float attention mask.

**Weighing the pooled keys.** A pooled key stands for several tokens, so its logit gets ``+log(n)``:
``exp(q.k_mean + log n) = n exp(q.k_mean)`` approximates the sum of the ``n`` separate terms (exact
when the keys in a cell are equal). By default ``n`` counts only the tokens of the cell that are *not*
in the query's own window (``n = count - overlap``; a cell wholly inside the window is masked out),
so every token of the grid is counted exactly once in the softmax's denominator: exactly, when it
is in the window, or through its pooled cell otherwise. Consequences:

* ``pool == 1``: the "pooled" keys are the tokens themselves and GRI equals exact attention for any
  window; ``window >= grid``: every cell is inside the window and GRI equals exact attention for any
  pool factor (both within float rounding).
* ``count_window_in_global=True`` gives the literal reading instead (``n = count``, the window's own
  tokens are counted twice: exactly and through their pool); kept for comparison.
* ``pool == 0`` switches the global part off (windowed attention only).

When the window and the shift are multiples of the pool factor, each cell is either wholly inside or
wholly outside a window (the node's defaults up to 1024 px: window 16, auto pool 8 or 16, no shift);
otherwise (auto pool 32 at 2048 px: one cell spans 2x2 windows) a partly covered cell keeps its full
mean key/value with the reduced weight ``count - overlap``.

What a call costs beyond the softmax itself (it matters on a GPU, where the attention of 320 keys per
query is cheap): one strided copy of each of q, k, v into the windows (into the compute dtype), two
pools and two strided writes of the pooled keys/values into their key slots, one copy of the result
back to the grid; the mask is built once per grid setting and dtype (none at all for whole windows
without a global part), and the replace reads the current sigma on the host only when its range is
not the whole schedule, once per UNet forward (a device sync otherwise per patched block). A shift or
a grid that is not a multiple of the window adds a padding copy of q, k, v, a crop of the result and
a row and a column of windows.

Layout as in ComfyUI's attention backends: q, k, v are ``[B, L, heads * dim_head]`` with
``L = H * W`` in row-major order; the result has the same shape (before ``to_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["GRILayout", "gri_attention", "exact_attention", "gri_layout", "attention_sites",
           "AttentionSite", "select_sites", "alternate_shift", "cost_ratio", "GRIReplace",
           "auto_pool", "site_attention", "SigmaRange"]


@dataclass(frozen=True)
class GRILayout:
    """Geometry of one (H, W, window, pool, shift) setting: padding, window counts and the key bias."""

    height: int
    width: int
    win_h: int
    win_w: int
    shift_h: int
    shift_w: int
    pad: tuple[int, int, int, int]  # top, bottom, left, right (window padding)
    n_h: int
    n_w: int
    pool: int
    pool_h: int  # number of pooled cells along H (ceil(H / pool)); 0 when pool == 0
    pool_w: int
    cell_count: torch.Tensor | None  # [pool_h, pool_w, 1] float32 tokens per cell (ragged edges < pool**2)
    bias: torch.Tensor  # [n_windows, 1, 1, T + G] float32: 0 / -inf window slots, log(n) / -inf pooled keys
    # SDPA-ready masks per (dtype, batch): built once, never per call (see ``mask``)
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_windows(self) -> int:
        return self.n_h * self.n_w

    @property
    def tokens_per_window(self) -> int:
        return self.win_h * self.win_w

    @property
    def n_global(self) -> int:
        return self.pool_h * self.pool_w

    @property
    def padded(self) -> bool:
        return any(self.pad)

    def mask(self, dtype: torch.dtype, batch: int) -> torch.Tensor | None:
        """The key bias as SDPA's ``attn_mask`` for ``batch`` images, ``[batch * n_windows, 1, 1, T + G]``
        in ``dtype`` (broadcast over heads and queries: never expanded to a full mask), cached; None when
        the bias is all zeros (whole windows, no global part), so SDPA may pick its mask-free kernels."""
        key = (dtype, batch)
        if key not in self._masks:
            if self.pool == 0 and not self.padded:
                self._masks[key] = None
            else:
                self._masks[key] = self.bias.to(dtype).repeat(batch, 1, 1, 1)
        return self._masks[key]


_LAYOUT_CACHE: dict[tuple, GRILayout] = {}
_LAYOUT_CACHE_MAX = 64


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def gri_layout(height: int, width: int, window, pool: int, shift=0, *, count_window_in_global: bool = False,
               device: torch.device | str = "cpu") -> GRILayout:
    """Padding, window grid and the [n_windows, 1, 1, T+G] key bias for one grid (cached per setting)."""
    win_h, win_w = _pair(window)
    sh, sw = _pair(shift)
    if height < 1 or width < 1 or win_h < 1 or win_w < 1 or pool < 0:
        raise ValueError(f"GRI: bad geometry H={height} W={width} window={window} pool={pool}")
    # a window at least as large as the grid is the whole grid (and then a shift would only add padding)
    win_h, win_w = min(win_h, height), min(win_w, width)
    sh = sh % win_h if win_h < height else 0
    sw = sw % win_w if win_w < width else 0
    device = torch.device(device)
    key = (height, width, win_h, win_w, sh, sw, pool, count_window_in_global, device)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        return hit

    pad_t, pad_l = sh, sw
    pad_b = (-(height + pad_t)) % win_h
    pad_r = (-(width + pad_l)) % win_w
    n_h = (height + pad_t + pad_b) // win_h
    n_w = (width + pad_l + pad_r) // win_w
    n_win = n_h * n_w
    T = win_h * win_w

    # regional part: which window slots hold a real token
    valid = torch.ones(height, width, device=device)
    valid = F.pad(valid, (pad_l, pad_r, pad_t, pad_b))
    valid = valid.view(n_h, win_h, n_w, win_w).permute(0, 2, 1, 3).reshape(n_win, T) > 0
    zero = torch.zeros((), device=device)
    neg_inf = torch.full((), float("-inf"), device=device)
    win_bias = torch.where(valid, zero, neg_inf)

    cell_count = None
    pool_h = pool_w = 0
    if pool > 0:
        pool_h, pool_w = -(-height // pool), -(-width // pool)
        G = pool_h * pool_w
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        cell = ((rows // pool)[:, None] * pool_w + (cols // pool)[None, :]).reshape(-1)
        count = torch.bincount(cell, minlength=G).to(torch.float32)
        cell_count = count.view(pool_h, pool_w, 1)
        if count_window_in_global:
            weight = count.expand(n_win, G)
        else:
            win = (((rows + pad_t) // win_h)[:, None] * n_w + ((cols + pad_l) // win_w)[None, :]).reshape(-1)
            overlap = torch.bincount(win * G + cell, minlength=n_win * G).view(n_win, G).to(torch.float32)
            weight = count[None, :] - overlap
        glob_bias = torch.where(weight > 0, torch.log(weight.clamp_min(1.0)), neg_inf)
        bias = torch.cat([win_bias, glob_bias], dim=1)
    else:
        bias = win_bias
    layout = GRILayout(height, width, win_h, win_w, sh, sw, (pad_t, pad_b, pad_l, pad_r), n_h, n_w, pool,
                       pool_h, pool_w, cell_count, bias.view(n_win, 1, 1, -1).contiguous())
    if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_MAX:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = layout
    return layout


def _pool_grid(x: torch.Tensor, lay: GRILayout) -> torch.Tensor:
    """[B, H, W, C] -> [B, G, C]: mean over each pool x pool cell (ragged edge cells: mean of what they hold).

    ``avg_pool2d`` on the channels-last view (5x faster than a reshape-mean on CPU); with ``ceil_mode``
    and no padding its edge windows divide by the tokens they really cover.
    """
    B = x.shape[0]
    p = lay.pool
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), p, p, ceil_mode=True)  # [B, C, pool_h, pool_w]
    return pooled.permute(0, 2, 3, 1).reshape(B, lay.n_global, x.shape[-1])


def _windows(x: torch.Tensor, lay: GRILayout, heads: int, extra: int = 0,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, W, C] -> [B, n_windows, heads, T + extra, d] in ``dtype``: the window tokens (zero-padded up
    to whole windows) in the first T slots, written by ONE strided copy (the cast to ``dtype`` included);
    the last ``extra`` slots are left for the caller to fill in place, so the pooled keys need no second
    copy through ``torch.cat``."""
    B, H, W, C = x.shape
    d = C // heads
    pt, pb, pl, pr = lay.pad
    if pt or pb or pl or pr:
        x = F.pad(x, (0, 0, pl, pr, pt, pb))
    x = x.view(B, lay.n_h, lay.win_h, lay.n_w, lay.win_w, heads, d).permute(0, 1, 3, 5, 2, 4, 6)
    T = lay.tokens_per_window
    out = x.new_empty(B, lay.n_h, lay.n_w, heads, T + extra, d, dtype=dtype or x.dtype)
    out[..., :T, :].view(B, lay.n_h, lay.n_w, heads, lay.win_h, lay.win_w, d).copy_(x)
    return out.view(B, lay.n_windows, heads, T + extra, d)


def gri_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, height: int, width: int, *,
                  window=16, pool: int = 4, shift=0, attn_precision: torch.dtype | None = None,
                  count_window_in_global: bool = False) -> torch.Tensor:
    """GRI attention of q, k, v ``[B, H*W, heads*dim_head]`` on an ``height x width`` grid -> same shape.

    ``window``: window side in tokens (int or (h, w)); ``pool``: global pooling factor (0 = no global
    part); ``shift``: window offset in tokens (int or (h, w)), e.g. ``window // 2`` on every other
    block; ``attn_precision``: compute in this dtype when it is wider than q's (SD2.x asks float32).
    """
    B, L, C = q.shape
    if L != height * width or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"GRI: q/k/v {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not a "
                         f"{height}x{width} self-attention grid")
    if C % heads:
        raise ValueError(f"GRI: width {C} is not a multiple of heads={heads}")
    out_dtype = q.dtype
    dtype = q.dtype  # compute dtype: widened inside the window copies, never by a separate cast
    if attn_precision is not None and torch.finfo(attn_precision).bits > torch.finfo(q.dtype).bits:
        dtype = attn_precision
    lay = gri_layout(height, width, window, pool, shift, count_window_in_global=count_window_in_global,
                     device=q.device)
    d = C // heads
    T = lay.tokens_per_window
    qg, kg, vg = (t.reshape(B, height, width, C) for t in (q, k, v))
    G = lay.n_global if pool > 0 else 0
    # every copy GRI makes: q, k, v into windows (3), the pooled k, v into the last G key slots (2 pools,
    # 2 strided writes), the result back to the grid (1); the mask is cached per layout
    qw = _windows(qg, lay, heads, 0, dtype)
    kw = _windows(kg, lay, heads, G, dtype)
    vw = _windows(vg, lay, heads, G, dtype)
    if G:  # pooled in the compute dtype (a wider attn_precision averages the widened tokens)
        kw[:, :, :, T:] = _pool_grid(kg.to(dtype), lay).view(B, 1, G, heads, d).transpose(2, 3)
        vw[:, :, :, T:] = _pool_grid(vg.to(dtype), lay).view(B, 1, G, heads, d).transpose(2, 3)
    # 4-D for SDPA: with 5-D inputs torch falls back to its slow "math" kernel (4x slower on CPU)
    nb = B * lay.n_windows
    out = F.scaled_dot_product_attention(qw.view(nb, heads, T, d), kw.view(nb, heads, T + G, d),
                                         vw.view(nb, heads, T + G, d), attn_mask=lay.mask(dtype, B))
    # [B, nWin, heads, T, d] -> [B, Hpad, Wpad, C] (one strided copy, cast back included) -> crop
    win = out.view(B, lay.n_h, lay.n_w, heads, lay.win_h, lay.win_w, d).permute(0, 1, 4, 2, 5, 3, 6)
    grid = torch.empty(B, lay.n_h, lay.win_h, lay.n_w, lay.win_w, heads, d, dtype=out_dtype, device=q.device)
    grid.copy_(win)
    grid = grid.view(B, lay.n_h * lay.win_h, lay.n_w * lay.win_w, C)
    if lay.padded:
        pt, _, pl, _ = lay.pad
        grid = grid[:, pt:pt + height, pl:pl + width]
    return grid.reshape(B, L, C)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """Plain softmax attention in the same layout (the baseline GRI is compared with)."""
    B, L, C = q.shape
    out_dtype = q.dtype
    if attn_precision is not None and torch.finfo(attn_precision).bits > torch.finfo(q.dtype).bits:
        q, k, v = q.to(attn_precision), k.to(attn_precision), v.to(attn_precision)
    d = C // heads
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, L, C).to(out_dtype)


def alternate_shift(ordinal: int, window: int) -> int:
    """Swin-style: no shift on even blocks, half a window on odd ones (so borders do not stay fixed)."""
    return (window // 2) if ordinal % 2 else 0


# ------------------------------------------------------------------------------------------------
# where the self-attentions of a UNet sit (duck-typed walk over ComfyUI's openaimodel layout)


@dataclass(frozen=True)
class AttentionSite:
    """One transformer block's self-attention: ComfyUI's attn1 replace key and its resolution level.

    ``level`` counts downsamplings from the input resolution (0 = full latent resolution);
    ``attn_rank`` is the position of that level among the levels that have self-attention
    (0 = the highest-resolution level with self-attention: level 0 on SD1.5, level 1 on SDXL).
    """

    block_name: str  # "input" | "middle" | "output"
    block_id: int
    index: int  # index in the SpatialTransformer's transformer_blocks
    level: int
    attn_rank: int = -1

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block_name, self.block_id, self.index)


def _self_attn_blocks(block) -> int:
    """Number of transformer blocks with a real self-attention (attn1) inside one UNet block."""
    n = 0
    for m in block.modules():
        tbs = getattr(m, "transformer_blocks", None)
        if tbs is not None and isinstance(tbs, torch.nn.ModuleList):
            n = max(n, sum(1 for tb in tbs if hasattr(tb, "attn1") and not getattr(tb, "disable_self_attn", False)))
    return n


def _has(block, class_name: str) -> bool:
    return any(type(m).__name__ == class_name for m in block.modules())


def attention_sites(diffusion_model) -> list[AttentionSite]:
    """Every self-attention of an ldm-layout UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``).

    Levels come from counting ``Downsample`` / ``Upsample`` modules, so any block layout works (SD1.5,
    SDXL, block-removed students, A-SDM-style mixes), not fixed indices.
    """
    sites: list[AttentionSite] = []
    level = 0
    for i, blk in enumerate(getattr(diffusion_model, "input_blocks", [])):
        for j in range(_self_attn_blocks(blk)):
            sites.append(AttentionSite("input", i, j, level))
        if _has(blk, "Downsample"):
            level += 1
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        for j in range(_self_attn_blocks(middle)):
            sites.append(AttentionSite("middle", 0, j, level))
    for i, blk in enumerate(getattr(diffusion_model, "output_blocks", [])):
        for j in range(_self_attn_blocks(blk)):
            sites.append(AttentionSite("output", i, j, level))
        if _has(blk, "Upsample"):
            level -= 1
    attn_levels = sorted({s.level for s in sites})
    rank = {lv: r for r, lv in enumerate(attn_levels)}
    return [AttentionSite(s.block_name, s.block_id, s.index, s.level, rank[s.level]) for s in sites]


def site_attention(diffusion_model, site: AttentionSite):
    """The self-attention module (``attn1``) of ``site`` in ``diffusion_model``, or None when the layout
    does not have it where the site says (e.g. a wrapped or replaced block)."""
    if site.block_name == "middle":
        block = getattr(diffusion_model, "middle_block", None)
    else:
        blocks = getattr(diffusion_model, f"{site.block_name}_blocks", None)
        block = blocks[site.block_id] if blocks is not None and site.block_id < len(blocks) else None
    if block is None:
        return None
    for m in block.modules():
        tbs = getattr(m, "transformer_blocks", None)
        if isinstance(tbs, torch.nn.ModuleList) and site.index < len(tbs):
            return getattr(tbs[site.index], "attn1", None)
    return None


def select_sites(sites: list[AttentionSite], levels: int, output_blocks: bool = True) -> list[AttentionSite]:
    """The sites of the ``levels`` highest-resolution self-attention levels: input blocks, the middle
    block when its level is selected, and output blocks when ``output_blocks``."""
    return [s for s in sites
            if 0 <= s.attn_rank < levels and (output_blocks or s.block_name != "output")]


def auto_pool(height: int, width: int, window: int) -> int:
    """Pool factor that leaves about ``(window / 2)^2`` pooled cells at any resolution (8x8 with the
    default window 16), so the global part adds about a quarter of a window's keys per query; 1 (exact
    attention) when the window covers the grid.

    Why this size: the global keys are a summary, like the spatial-reduction keys of pyramid vision
    transformers (7x7 at their finest stage); each costs as much as a window key, and measured on CPU
    (``bench/bench_gri.py``) a window-sized copy (16x16) makes GRI's attention 1.7x HyperTile's time at
    equal window, the quarter-window copy 1.2x.
    """
    side = max(height, width)
    if window >= side:
        return 1
    return max(1, -(-2 * side // max(1, window)))


def cost_ratio(height: int, width: int, window: int, pool: int) -> float:
    """Keys per query of GRI over exact attention (what the attention matmuls scale with)."""
    lay_keys = min(window, height) * min(window, width)
    if pool > 0:
        lay_keys += math.ceil(height / pool) * math.ceil(width / pool)
    return lay_keys / float(height * width)


# ------------------------------------------------------------------------------------------------
# the attn1 replace callable (host-free: the host's exact attention is passed in)


class SigmaRange:
    """``[sigma_end, sigma_start]`` of the schedule where GRI runs, decided without stalling a GPU.

    The current sigma is a device tensor (``transformer_options["sigmas"]``); reading it on the host is a
    device sync, which empties the GPU's queue. So: no read at all when the range is the whole schedule
    (``sigma_start`` infinite, ``sigma_end <= 0``: the node's defaults), else one read per UNet forward,
    shared by every patched block of that forward (they get the same sigmas tensor) through this object.
    One entry per device, so the threads of a multi-GPU run keep their own.
    """

    def __init__(self, sigma_start: float, sigma_end: float):
        self.start = float(sigma_start)
        self.end = float(sigma_end)
        self.everywhere = math.isinf(self.start) and self.start > 0 and self.end <= 0.0
        self._last: dict = {}  # device -> (the sigmas tensor last decided, decision)

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone: share the decision cache
        return self

    def contains(self, sigmas) -> bool:
        if self.everywhere or sigmas is None:
            return True
        if not torch.is_tensor(sigmas):
            return self.end <= float(max(sigmas)) <= self.start
        hit = self._last.get(sigmas.device)
        if hit is not None and hit[0] is sigmas:
            return hit[1]
        inside = self.end <= float(sigmas.max()) <= self.start
        self._last[sigmas.device] = (sigmas, inside)
        return inside


class GRIReplace:
    """An ``attn1`` replace for one transformer block: ``fn(q, k, v, extra_options) -> out``.

    ``pool=None`` picks the pool factor per grid with :func:`auto_pool`. Runs GRI attention when the
    current sigma is inside ``[sigma_end, sigma_start]`` (``sigma_range``: a :class:`SigmaRange` shared by
    the blocks of one patch, so the sigma is read once per UNet forward; built from the two sigmas when
    not given) and q/k/v are the block's own ``H x W`` self-attention grid
    (``extra_options["activations_shape"]``); otherwise it
    hands the call to ``previous`` (the replace another pack had put on this block, if any) or to
    ``fallback(q, k, v, heads, attn_precision=..., transformer_options=...)``, the host's exact
    attention as this layer runs it (the node binds the layer's own attention choice into it where the
    host has one), so the block behaves as unpatched. Another pack's replace is therefore kept, and
    overridden only inside GRI's own sigma range.
    """

    def __init__(self, *, window: int, pool: int | None, shift: int, sigma_start: float, sigma_end: float,
                 fallback, previous=None, count_window_in_global: bool = False,
                 sigma_range: SigmaRange | None = None):
        self.window = int(window)
        self.pool = None if pool is None else int(pool)
        self.shift = int(shift)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.sigma_range = sigma_range or SigmaRange(sigma_start, sigma_end)
        self.fallback = fallback
        self.previous = previous
        self.count_window_in_global = bool(count_window_in_global)

    def grid(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> tuple[int, int] | None:
        """(H, W) when this call is in range and is the block's own self-attention grid, else None."""
        shape = extra_options.get("activations_shape")
        if shape is None or len(shape) < 4:
            return None
        H, W = int(shape[-2]), int(shape[-1])
        # another pack's attn1_patch may have re-tiled or merged tokens (HyperTile, ToMe): leave those alone
        if q.shape[1] != H * W or k.shape != q.shape:
            return None
        if not self.sigma_range.contains(extra_options.get("sigmas")):
            return None
        return H, W

    def __call__(self, q, k, v, extra_options):
        hw = self.grid(q, k, extra_options)
        if hw is not None:
            pool = auto_pool(hw[0], hw[1], self.window) if self.pool is None else self.pool
            return gri_attention(q, k, v, extra_options["n_heads"], hw[0], hw[1], window=self.window,
                                 pool=pool, shift=self.shift, attn_precision=extra_options.get("attn_precision"),
                                 count_window_in_global=self.count_window_in_global)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.fallback(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                             transformer_options=extra_options)
