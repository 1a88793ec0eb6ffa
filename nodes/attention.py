"""GRIAttention: A-SDM global-regional interactive self-attention patched onto a cloned MODEL.

The maths lives in ``models/patches/gri.py``; this node finds the self-attentions of the chosen resolution
levels in the model's own UNet (any block layout: SD1.5, SD2, SDXL, block-removed students), and puts
one keyed ``attn1`` replace per transformer block on a clone, chaining any replace already there.
"""

from __future__ import annotations

import logging
import math

import comfy.ldm.modules.attention as comfy_attention
from comfy_api.latest import io

from ..models.errors import PackError
from ..models.patches.gri import GRIReplace, SigmaRange, alternate_shift, attention_sites, select_sites, site_attention

log = logging.getLogger("distilled_unets")

CATEGORY = "distilled_unets/model_patches"
NODE = "GRIAttention"
# per-layer attention choice of newer ComfyUI: CrossAttention keeps it here and passes it to
# optimized_attention as ``preferred_attention`` (hosts without it have no such attribute)
LAYER_CHOICE = "comfy_attention"


class ExactAttention:
    """ComfyUI's exact attention as ``layer`` (a CrossAttention) would run it unpatched: the host's current
    backend (looked up per call, as CrossAttention does), the ``optimized_attention_override`` in
    transformer_options, and the layer's own attention choice where the host offers one (the layer's
    ``comfy_attention``, read per call, passed as ``preferred_attention``)."""

    def __init__(self, layer=None):
        self.layer = layer

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone; the layer is not ours to copy
        return self

    def preferred(self):
        return getattr(self.layer, LAYER_CHOICE, None) if self.layer is not None else None

    def __call__(self, q, k, v, heads, attn_precision=None, transformer_options=None):
        kwargs = {}
        choice = self.preferred()
        if choice is not None:
            kwargs["preferred_attention"] = choice
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=attn_precision,
                                                   transformer_options=transformer_options or {}, **kwargs)


def patch_gri(model, *, window: int, pool: int | None, levels: int = 1, start_percent: float = 0.0,
              end_percent: float = 1.0, output_blocks: bool = True, shifted_windows: bool = False):
    """A clone of ``model`` (a ModelPatcher) with GRI attention on the selected self-attentions.

    ``pool`` None (the node's 0) = auto: see ``models.patches.gri.auto_pool``. Returns (patched clone, sites).
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise PackError(f"start_percent {start_percent} is after end_percent {end_percent}",
                        "set start_percent <= end_percent (0 = start of sampling, 1 = end)", node=NODE,
                        input_name="end_percent")
    diffusion_model = getattr(model.model, "diffusion_model", None)
    sites = attention_sites(diffusion_model) if diffusion_model is not None else []
    if not sites:
        raise PackError(f"the model ({type(diffusion_model).__name__}) has no UNet self-attention blocks",
                        "connect a Stable Diffusion UNet (SD1.5, SD2, SDXL or a distilled student of them)",
                        node=NODE, input_name="model")
    chosen = select_sites(sites, levels, output_blocks)
    m = model.clone()
    ms = m.get_model_object("model_sampling")
    # the whole schedule: an open range, so the replaces never read the sigma (a GPU sync) at all
    sigma_start = math.inf if start_percent <= 0.0 else ms.percent_to_sigma(start_percent)
    sigma_end = 0.0 if end_percent >= 1.0 else ms.percent_to_sigma(end_percent)
    sigma_range = SigmaRange(sigma_start, sigma_end)  # one sigma read per forward, shared by every block
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    ordinal: dict[int, int] = {}
    chained = 0
    for s in chosen:
        n = ordinal.get(s.level, 0)
        ordinal[s.level] = n + 1
        previous = existing.get(s.key, existing.get((s.block_name, s.block_id)))
        chained += previous is not None
        fn = GRIReplace(window=window, pool=pool, shift=alternate_shift(n, window) if shifted_windows else 0,
                        sigma_start=sigma_start, sigma_end=sigma_end, sigma_range=sigma_range,
                        fallback=ExactAttention(site_attention(diffusion_model, s)), previous=previous)
        m.set_model_attn1_replace(fn, s.block_name, s.block_id, s.index)
    log.info("GRIAttention: window %d, pool %s on %d self-attention(s) at level(s) %s (%s); %d existing "
             "replace(s) chained", window, "auto" if pool is None else pool, len(chosen),
             sorted({s.level for s in chosen}),
             ", ".join(f"{s.block_name}{s.block_id}.{s.index}" for s in chosen), chained)
    return m, chosen


class GRIAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="GRI Attention (global-regional, fast high-res)",
            category=CATEGORY,
            description=(
                "A-SDM global-regional interactive attention: on the highest-resolution self-attention "
                "levels each token attends, in one softmax, to the tokens of its own window and to an "
                "average-pooled copy of the whole image (each pooled token weighted by the tokens it stands "
                "for). Much cheaper than full self-attention at 1024 px and above; cross-attention (the "
                "prompt) is untouched. With a window covering the latent, or pool factor 1, it is exact "
                "attention. Works on SD1.5, SD2, SDXL and their distilled students; to patch one UNet of a "
                "Multi-UNet Model, patch it before routing."),
            inputs=[
                io.Model.Input("model", tooltip="The UNet to patch (left unchanged; a patched copy is returned)."),
                io.Int.Input("window_size", default=16, min=1, max=256,
                             tooltip="Window side in tokens of the patched level (at SD1.5's top level one token "
                             "is 8 px: 16 -> 128 px windows). Larger: closer to exact, slower."),
                io.Int.Input("pool_factor", default=0, min=0, max=64,
                             tooltip="Global part: the whole grid average-pooled by this factor (4 -> one key "
                             "per 4x4 tokens). 0 = auto: a factor that leaves about (window/2) x (window/2) "
                             "pooled tokens at any resolution (16 at 1024 px on SD1.5 with window 16: an 8x8 "
                             "summary of the image). 1 = every token (exact attention, no speed-up)."),
                io.Int.Input("levels", default=1, min=1, max=8,
                             tooltip="How many of the highest-resolution levels that have self-attention to "
                             "patch (1 = the highest only: level 0 on SD1.5, the 2x-down level on SDXL)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the part of the schedule that uses GRI (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the part of the schedule that uses GRI (1 = last step). "
                               "Outside the range the blocks run exact attention."),
                io.Boolean.Input("output_blocks", default=True,
                                 tooltip="Patch the decoder (output) blocks of those levels too. On SD1.5 they "
                                 "hold 3 of the 5 top-level self-attentions."),
                io.Boolean.Input("shifted_windows", default=False,
                                 tooltip="Offset the windows by half a window on every other patched block "
                                 "(Swin-style), so window borders do not stay fixed. Off by default: the "
                                 "pooled global keys already carry information across windows, and a shift "
                                 "costs an extra row and column of windows (about 1.5x GRI's attention time "
                                 "on the shifted blocks). Turn on if window seams show."),
            ],
            outputs=[io.Model.Output(tooltip="The patched MODEL: connect to a sampler.")],
        )

    @classmethod
    def execute(cls, model, window_size, pool_factor, levels, start_percent, end_percent, output_blocks,
                shifted_windows) -> io.NodeOutput:
        m, _ = patch_gri(model, window=window_size, pool=pool_factor or None, levels=levels,
                         start_percent=start_percent, end_percent=end_percent, output_blocks=output_blocks,
                         shifted_windows=shifted_windows)
        return io.NodeOutput(m)


NODES = [GRIAttention]
