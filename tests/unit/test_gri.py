"""GRI attention maths (models/patches/gri.py): exactness, any grid, shapes, dtypes, an independent slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from distilled_unets.models.patches import gri
from torch.utils._python_dispatch import TorchDispatchMode


def _qkv(B=2, H=13, W=10, heads=2, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H * W, heads * d, generator=g).to(dtype) for _ in range(3))


def _reference(q, k, v, heads, H, W, window, pool, shift=0, count_window_in_global=False):
    """Slow, explicit GRI: for every window (its own loop over grid positions) and every pooled cell
    (its own loop over tokens), list the keys, weights and values one query sees, then softmax.
    Written from the definition, sharing nothing with the fast path."""
    B, L, C = q.shape
    d = C // heads
    q, k, v = (t.double().view(B, H, W, heads, d) for t in (q, k, v))
    wh, ww = min(window, H), min(window, W)
    sh = shift % wh if wh < H else 0
    sw = shift % ww if ww < W else 0

    def window_of(r, c):
        return ((r + sh) // wh, (c + sw) // ww)

    cells = []  # (list of token positions) per pooled cell
    if pool > 0:
        for r0 in range(0, H, pool):
            for c0 in range(0, W, pool):
                cells.append([(r, c) for r in range(r0, min(r0 + pool, H)) for c in range(c0, min(c0 + pool, W))])
    out = torch.zeros(B, H, W, heads, d, dtype=torch.float64)
    for b in range(B):
        for n in range(heads):
            pooled_k = [torch.stack([k[b, r, c, n] for r, c in cell]).mean(0) for cell in cells]
            pooled_v = [torch.stack([v[b, r, c, n] for r, c in cell]).mean(0) for cell in cells]
            for r in range(H):
                for c in range(W):
                    me = window_of(r, c)
                    keys, vals, logw = [], [], []
                    for rr in range(H):
                        for cc in range(W):
                            if window_of(rr, cc) == me:
                                keys.append(k[b, rr, cc, n])
                                vals.append(v[b, rr, cc, n])
                                logw.append(0.0)
                    for cell, pk, pv in zip(cells, pooled_k, pooled_v):
                        inside = sum(1 for (rr, cc) in cell if window_of(rr, cc) == me)
                        weight = len(cell) if count_window_in_global else len(cell) - inside
                        if weight > 0:
                            keys.append(pk)
                            vals.append(pv)
                            logw.append(math.log(weight))
                    K = torch.stack(keys)
                    V = torch.stack(vals)
                    logits = K @ q[b, r, c, n] / math.sqrt(d) + torch.tensor(logw, dtype=torch.float64)
                    out[b, r, c, n] = torch.softmax(logits, 0) @ V
    return out.reshape(B, L, C)


# ------------------------------------------------------------------------------------------------
# degenerate settings are exact attention


@pytest.mark.parametrize("H,W", [(13, 10), (8, 8), (7, 16), (1, 5)])
@pytest.mark.parametrize("window,pool,shift", [
    (64, 4, 0),   # window covers the grid: every pooled cell lies inside it -> masked out
    (64, 0, 0),   # window covers the grid, no global part
    (64, 3, 5),   # a shift is ignored when the window covers the grid
    (4, 1, 0),    # pool 1: out-of-window tokens come back one by one, each counted once
    (4, 1, 2),
    (3, 1, 1),
])
def test_degenerate_settings_equal_exact_attention(H, W, window, pool, shift):
    q, k, v = _qkv(H=H, W=W)
    exact = gri.exact_attention(q, k, v, 2)
    out = gri.gri_attention(q, k, v, 2, H, W, window=window, pool=pool, shift=shift)
    assert out.shape == q.shape
    assert (out - exact).abs().max().item() <= 1e-6


def test_literal_weighting_is_exact_when_window_covers_grid_and_pool_is_one():
    q, k, v = _qkv()
    exact = gri.exact_attention(q, k, v, 2)
    out = gri.gri_attention(q, k, v, 2, 13, 10, window=13, pool=1, count_window_in_global=True)
    assert (out - exact).abs().max().item() <= 1e-6  # every key twice, weight 1 each: same softmax


# ------------------------------------------------------------------------------------------------
# the fast path equals the slow reference in non-degenerate settings


@pytest.mark.parametrize("window,pool,shift,literal", [
    (4, 3, 0, False),
    (4, 2, 2, False),   # shifted, window and shift multiples of the pool
    (5, 3, 2, False),   # partly covered cells, ragged windows and ragged pools
    (4, 3, 0, True),    # literal weighting: own window counted twice
    (4, 0, 1, False),   # regional only, shifted
])
def test_fast_path_equals_independent_reference(window, pool, shift, literal):
    H, W, heads = 13, 10, 2
    q, k, v = _qkv(B=2, H=H, W=W, heads=heads, d=4, seed=1)
    ref = _reference(q, k, v, heads, H, W, window, pool, shift, literal)
    out = gri.gri_attention(q, k, v, heads, H, W, window=window, pool=pool, shift=shift,
                            count_window_in_global=literal)
    assert (out.double() - ref).abs().max().item() <= 2e-6
    # and it is a genuine approximation here, not exact attention in disguise
    assert (out - gri.exact_attention(q, k, v, heads)).abs().max().item() > 1e-3


def test_shift_moves_window_borders():
    q, k, v = _qkv(H=16, W=16, seed=3)
    a = gri.gri_attention(q, k, v, 2, 16, 16, window=8, pool=4, shift=0)
    b = gri.gri_attention(q, k, v, 2, 16, 16, window=8, pool=4, shift=4)
    assert (a - b).abs().max().item() > 1e-3
    # a shift of a whole window is the same partition (only more padding)
    c = gri.gri_attention(q, k, v, 2, 16, 16, window=8, pool=4, shift=8)
    assert torch.allclose(a, c, atol=1e-6)
    assert gri.alternate_shift(0, 8) == 0 and gri.alternate_shift(1, 8) == 4


def test_rectangular_window():
    H, W = 9, 7
    q, k, v = _qkv(B=1, H=H, W=W, heads=1, d=4, seed=4)
    out = gri.gri_attention(q, k, v, 1, H, W, window=(3, 7), pool=2)
    # a 3x7 window on a width-7 grid: row bands; compare with the reference of a 3-row band
    lay = gri.gri_layout(H, W, (3, 7), 2)
    assert (lay.n_h, lay.n_w, lay.tokens_per_window) == (3, 1, 21)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# geometry, shapes, dtypes


@pytest.mark.parametrize("H,W,window,pool,shift", [(13, 10, 4, 3, 0), (13, 10, 4, 2, 2), (32, 24, 16, 4, 8),
                                                   (5, 9, 4, 4, 1)])
def test_every_token_is_counted_once_per_window(H, W, window, pool, shift):
    lay = gri.gri_layout(H, W, window, pool, shift)
    total = lay.bias.exp().sum(dim=-1).flatten()  # exp(0)=1 per real window slot, n per pooled key
    assert torch.allclose(total, torch.full_like(total, float(H * W)))
    assert lay.n_h * lay.win_h == H + sum(lay.pad[:2]) and lay.n_w * lay.win_w == W + sum(lay.pad[2:])
    assert lay.n_h == math.ceil((H + lay.shift_h) / lay.win_h)


def test_non_divisible_grid_window_count():
    lay = gri.gri_layout(13, 10, 4, 3)
    assert (lay.n_h, lay.n_w, lay.pool_h, lay.pool_w) == (4, 3, 5, 4)
    assert lay.cell_count[-1, -1, 0].item() == 1.0  # 13 = 4*3+1 rows, 10 = 3*3+1 cols: a 1-token corner cell
    big = gri.gri_layout(13, 10, 40, 0, shift=7)
    assert (big.win_h, big.win_w, big.shift_h, big.shift_w, big.n_windows) == (13, 10, 0, 0, 1)


@pytest.mark.parametrize("B,heads,d", [(1, 1, 8), (3, 4, 16), (2, 8, 5)])
def test_batch_and_heads_are_independent(B, heads, d):
    H, W = 12, 9
    q, k, v = _qkv(B=B, H=H, W=W, heads=heads, d=d, seed=5)
    out = gri.gri_attention(q, k, v, heads, H, W, window=4, pool=2, shift=2)
    assert out.shape == (B, H * W, heads * d)
    # each batch item on its own gives the same rows
    for b in range(B):
        one = gri.gri_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], heads, H, W, window=4, pool=2, shift=2)
        assert torch.allclose(out[b:b + 1], one, atol=1e-6)
    # each head on its own (its slice of the channels) gives the same channels
    for n in range(heads):
        sl = slice(n * d, (n + 1) * d)
        one = gri.gri_attention(q[..., sl], k[..., sl], v[..., sl], 1, H, W, window=4, pool=2, shift=2)
        assert torch.allclose(out[..., sl], one, atol=1e-6)


def test_bad_shapes_raise():
    q, k, v = _qkv(H=4, W=4)
    with pytest.raises(ValueError):
        gri.gri_attention(q, k, v, 2, 4, 5)
    with pytest.raises(ValueError):
        gri.gri_attention(q, k[:, :8], v[:, :8], 2, 4, 4)
    with pytest.raises(ValueError):
        gri.gri_attention(q, k, v, 3, 4, 4)


def _supports(dtype) -> bool:
    try:
        x = torch.randn(1, 1, 4, 8).to(dtype)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=torch.zeros(1, 1, 1, 4, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths(dtype):
    if not _supports(dtype):
        pytest.skip(f"this torch has no CPU scaled_dot_product_attention for {dtype}")
    H, W = 13, 10
    q32, k32, v32 = _qkv(H=H, W=W, heads=2, d=16, seed=6)
    ref = gri.gri_attention(q32, k32, v32, 2, H, W, window=4, pool=3, shift=2)
    q, k, v = (t.to(dtype) for t in (q32, k32, v32))
    out = gri.gri_attention(q, k, v, 2, H, W, window=4, pool=3, shift=2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out.float() - ref).abs().max().item() < tol
    # attn_precision=float32 (what SD2.x asks for): computed wide, returned in the input dtype
    wide = gri.gri_attention(q, k, v, 2, H, W, window=4, pool=3, shift=2, attn_precision=torch.float32)
    assert wide.dtype == dtype
    ref_cast = gri.gri_attention(q.float(), k.float(), v.float(), 2, H, W, window=4, pool=3, shift=2)
    assert torch.equal(wide, ref_cast.to(dtype))
    # degenerate case stays exact up to the dtype's rounding
    ex = gri.exact_attention(q, k, v, 2)
    dg = gri.gri_attention(q, k, v, 2, H, W, window=16, pool=4)
    assert (dg.float() - ex.float()).abs().max().item() < tol


# ------------------------------------------------------------------------------------------------
# finding the self-attentions of a UNet (duck-typed; real ComfyUI UNets are covered in tests/comfy)


class Downsample(torch.nn.Module):
    pass


class Upsample(torch.nn.Module):
    pass


class _TB(torch.nn.Module):
    def __init__(self, disable=False):
        super().__init__()
        self.attn1 = torch.nn.Identity()
        self.disable_self_attn = disable


class _ST(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_TB() for _ in range(depth)])


def _seq(*mods):
    return torch.nn.Sequential(*mods) if mods else torch.nn.Sequential(torch.nn.Identity())


def test_attention_sites_follow_the_block_layout():
    # SDXL-like: level 0 without attention, level 1 depth 2, level 2 depth 3 (+ middle)
    net = torch.nn.Module()
    net.input_blocks = torch.nn.ModuleList([_seq(), _seq(), _seq(Downsample()), _seq(torch.nn.Identity(), _ST(2)),
                                            _seq(Downsample()), _seq(torch.nn.Identity(), _ST(3))])
    net.middle_block = _seq(_ST(3))
    net.output_blocks = torch.nn.ModuleList([_seq(torch.nn.Identity(), _ST(3)),
                                             _seq(torch.nn.Identity(), _ST(3), Upsample()),
                                             _seq(torch.nn.Identity(), _ST(2)),
                                             _seq(torch.nn.Identity(), _ST(2), Upsample()), _seq(), _seq()])
    sites = gri.attention_sites(net)
    assert [(s.block_name, s.block_id, s.index, s.level, s.attn_rank) for s in sites if s.attn_rank == 0] == [
        ("input", 3, 0, 1, 0), ("input", 3, 1, 1, 0), ("output", 2, 0, 1, 0), ("output", 2, 1, 1, 0),
        ("output", 3, 0, 1, 0), ("output", 3, 1, 1, 0)]
    assert {s.level for s in sites} == {1, 2}
    top = gri.select_sites(sites, levels=1, output_blocks=False)
    assert [s.key for s in top] == [("input", 3, 0), ("input", 3, 1)]
    assert len(gri.select_sites(sites, levels=2, output_blocks=True)) == len(sites)
    assert not any(s.block_name == "middle" for s in gri.select_sites(sites, levels=1))
    # each site's own attn1 module (the node binds its exact-attention fallback to it)
    for site in sites:
        block = net.middle_block if site.block_name == "middle" else getattr(net, f"{site.block_name}_blocks")[
            site.block_id]
        st = next(m for m in block.modules() if isinstance(m, _ST))
        assert gri.site_attention(net, site) is st.transformer_blocks[site.index].attn1
    assert gri.site_attention(net, gri.AttentionSite("input", 99, 0, 0)) is None
    assert gri.site_attention(net, gri.AttentionSite("input", 3, 5, 1)) is None


def test_cost_ratio():
    assert gri.cost_ratio(128, 128, 16, 4) == pytest.approx((256 + 1024) / 16384)
    assert gri.cost_ratio(8, 8, 16, 0) == 1.0


@pytest.mark.parametrize("H, W, window, pool, cells", [
    (128, 128, 16, 16, (8, 8)),   # SD1.5 top level at 1024 px: an 8x8 summary
    (64, 64, 16, 8, (8, 8)),      # 512 px
    (256, 256, 16, 32, (8, 8)),   # 2048 px
    (128, 96, 16, 16, (8, 6)),    # landscape/portrait: the long side sets the factor
    (100, 100, 16, 13, (8, 8)),   # not a multiple: ragged edge cells, still about (window/2)^2
    (16, 16, 16, 1, (16, 16)),    # window covers the grid: pool 1, i.e. exact attention
    (8, 8, 16, 1, (8, 8)),
])
def test_auto_pool_leaves_about_a_quarter_window_of_global_keys(H, W, window, pool, cells):
    assert gri.auto_pool(H, W, window) == pool
    lay = gri.gri_layout(H, W, window, pool)
    assert (lay.pool_h, lay.pool_w) == cells


def test_auto_pool_replace_is_exact_when_window_covers_grid():
    q, k, v = _qkv(B=1, H=6, W=5, heads=2, d=4)
    fn = gri.GRIReplace(window=8, pool=None, shift=0, sigma_start=1e9, sigma_end=0.0,
                        fallback=lambda *a, **kw: pytest.fail("GRI did not run"))
    out = fn(q, k, v, {"n_heads": 2, "activations_shape": (1, 8, 6, 5), "sigmas": torch.tensor([1.0])})
    torch.testing.assert_close(out, gri.exact_attention(q, k, v, 2), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# lean: what one GRI call runs (the GPU cost beyond the attention itself is these copies and host syncs)


class _Ops(TorchDispatchMode):
    """Counts the aten ops run inside the ``with`` (below autograd: what kernels would be launched)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_one_call_copies_each_tensor_once_and_builds_no_mask():
    H = W = 16
    q, k, v = _qkv(B=2, H=H, W=W, heads=2, d=8)
    gri.gri_attention(q, k, v, 2, H, W, window=8, pool=4)  # first call builds the layout and its mask
    with _Ops() as ops:
        gri.gri_attention(q, k, v, 2, H, W, window=8, pool=4)
    n = {name: ops.names.count(name) for name in set(ops.names)}
    # q, k, v into windows (3), pooled k and v into their key slots (2), the result back to the grid (1)
    assert n.get("copy_") == 6, n
    assert n.get("avg_pool2d") == 2, n
    assert sum(c for name, c in n.items() if "scaled_dot_product" in name and name.startswith("_")) == 1, n
    # no padding copy, no concatenation, no mask or dtype cast per call, no host sync
    for absent in ("constant_pad_nd", "cat", "repeat", "_to_copy", "clone", "_local_scalar_dense"):
        assert absent not in n, (absent, n)
    lay = gri.gri_layout(H, W, 8, 4)
    assert lay.mask(torch.float32, 2) is lay.mask(torch.float32, 2)
    assert lay.mask(torch.float32, 2).shape == (2 * lay.n_windows, 1, 1, lay.tokens_per_window + lay.n_global)
    assert gri.gri_layout(H, W, 8, 0).mask(torch.float32, 2) is None  # whole windows, no global part: no mask


def test_sigma_range_reads_the_sigma_once_per_forward_and_never_for_the_whole_schedule():
    meta = torch.empty(2, device="meta")  # reading it on the host raises: proves it is not read
    assert gri.SigmaRange(math.inf, 0.0).contains(meta)
    part = gri.SigmaRange(5.0, 1.0)
    sigmas = torch.tensor([3.0, 3.0])
    with _Ops() as ops:
        decisions = [part.contains(sigmas) for _ in range(5)]  # five patched blocks of one forward
    assert decisions == [True] * 5 and ops.names.count("_local_scalar_dense") == 1
    assert not part.contains(torch.tensor([7.0, 7.0]))  # a new forward (a new tensor) is read again
    assert part.contains(torch.tensor([1.0])) and part.contains(torch.tensor([5.0]))  # both ends inside


def test_replace_without_a_range_runs_no_host_sync():
    q, k, v = _qkv(B=1, H=8, W=8, heads=2, d=4)
    fn = gri.GRIReplace(window=4, pool=2, shift=0, sigma_start=math.inf, sigma_end=0.0,
                        fallback=lambda *a, **kw: pytest.fail("GRI did not run"))
    extra = {"n_heads": 2, "activations_shape": (1, 8, 8, 8), "sigmas": torch.tensor([3.0])}
    fn(q, k, v, extra)
    with _Ops() as ops:
        fn(q, k, v, extra)
    assert "_local_scalar_dense" not in ops.names
