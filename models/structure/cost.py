"""Parameter count and per-step compute of a Topology, counted block by block (no weights needed).

The parameter count is exact for ComfyUI's ``UNetModel`` (tested against the reference's exact
counts for every public student and teacher). The compute is an estimate in multiply-accumulates
(MACs) of one UNet evaluation at a latent size: convolutions, linear layers and the two attention
matmuls; norms and activations are ignored. Ratios against the teacher are what the loader reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from .topology import Topology

TEXT_TOKENS = 77


@dataclass
class Cost:
    params: int = 0
    macs: int = 0

    def add(self, params: int = 0, macs: int = 0):
        self.params += params
        self.macs += macs


def _conv(c: Cost, cin: int, cout: int, k: int, hw: int):
    c.add(cin * cout * k * k + cout, cin * cout * k * k * hw)


def _linear(c: Cost, cin: int, cout: int, tokens: int = 1, bias: bool = True):
    c.add(cin * cout + (cout if bias else 0), cin * cout * tokens)


def _resblock(c: Cost, cin: int, cout: int, temb: int, hw: int):
    c.add(2 * cin + 2 * cout)  # two GroupNorms
    _conv(c, cin, cout, 3, hw)
    _linear(c, temb, cout)
    _conv(c, cout, cout, 3, hw)
    if cin != cout:
        _conv(c, cin, cout, 1, hw)


def _transformer(c: Cost, ch: int, depth: int, ctx: int, hw: int, self_ctx: bool):
    c.add(2 * ch)  # GroupNorm
    _linear(c, ch, ch, hw)  # proj_in (linear or 1x1 conv: same count)
    for _ in range(depth):
        c.add(6 * ch)  # three LayerNorms
        kv_in = ctx if self_ctx else ch
        kv_tokens = TEXT_TOKENS if self_ctx else hw
        # attn1: q from tokens, k/v from tokens (or from the text when it is a cross-attention)
        _linear(c, ch, ch, hw, bias=False)
        _linear(c, kv_in, ch, kv_tokens, bias=False)
        _linear(c, kv_in, ch, kv_tokens, bias=False)
        _linear(c, ch, ch, hw)
        c.add(0, 2 * hw * kv_tokens * ch)
        # attn2: cross-attention to the text
        _linear(c, ch, ch, hw, bias=False)
        _linear(c, ctx, ch, TEXT_TOKENS, bias=False)
        _linear(c, ctx, ch, TEXT_TOKENS, bias=False)
        _linear(c, ch, ch, hw)
        c.add(0, 2 * hw * TEXT_TOKENS * ch)
        # GEGLU feed-forward
        _linear(c, ch, ch * 8, hw)
        _linear(c, ch * 4, ch, hw)
    _linear(c, ch, ch, hw)  # proj_out


def unet_cost(t: Topology, latent_h: int = 64, latent_w: int = 64) -> Cost:
    """Exact parameters and estimated MACs of one UNet evaluation at ``latent_h``×``latent_w``."""
    c = Cost()
    mc = t.model_channels
    temb = mc * 4
    hw = latent_h * latent_w
    _conv(c, t.in_channels, mc, 3, hw)
    _linear(c, mc, temb)
    _linear(c, temb, temb)
    if t.adm_in_channels:
        _linear(c, t.adm_in_channels, temb)
        _linear(c, temb, temb)
    dsa = t.disable_self_attn or (False,) * t.levels
    skips = [mc]
    ch = mc
    depths = iter(t.transformer_depth)
    h, w = latent_h, latent_w
    for level in range(t.levels):
        out = t.level_channels(level)
        for _ in range(t.num_res_blocks[level]):
            _resblock(c, ch, out, temb, h * w)
            ch = out
            d = next(depths)
            if d:
                _transformer(c, ch, d, t.context_dim, h * w, dsa[level])
            skips.append(ch)
        if level != t.levels - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            _conv(c, ch, ch, 3, h * w)
            skips.append(ch)
    if t.transformer_depth_middle >= -1:
        _resblock(c, ch, ch, temb, h * w)
        if t.transformer_depth_middle >= 0:
            _transformer(c, ch, t.transformer_depth_middle, t.context_dim, h * w, False)
            _resblock(c, ch, ch, temb, h * w)
    out_depths = iter(t.output_depths())
    sizes = []
    hh, ww = latent_h, latent_w
    for _level in range(t.levels):
        sizes.append((hh, ww))
        hh, ww = (hh + 1) // 2, (ww + 1) // 2
    for level in reversed(range(t.levels)):
        out = t.level_channels(level)
        h, w = sizes[level]
        n = t.num_res_blocks[level] + 1
        for i in range(n):
            _resblock(c, ch + skips.pop(), out, temb, h * w)
            ch = out
            d = next(out_depths)
            if d:
                _transformer(c, ch, d, t.context_dim, h * w, dsa[level])
            if level and i == n - 1:
                _conv(c, ch, ch, 3, sizes[level - 1][0] * sizes[level - 1][1])
    c.add(2 * ch)
    _conv(c, ch, t.out_channels, 3, latent_h * latent_w)
    return c
