"""The engine's hooks into ComfyUI's openaimodel ``UNetModel`` (duck-typed: ``input_blocks``, ``middle_block``,
``output_blocks``): a fused-attention override with a backward on every device, gradient checkpointing of res
blocks and transformers (whole, or selective: only the cheap element-wise ops recomputed), and forward hooks that
record the feature points' outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DistillError


def sdpa_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                   skip_output_reshape=False, **kwargs):
    """An ``optimized_attention_override`` that runs torch's fused SDPA (which has a backward on every device).

    ComfyUI picks its attention backend at import: on CPU the sub-quadratic one (slow and memory-hungry
    when differentiated), on GPUs possibly sage attention (no backward). Masked calls go to ``func``.
    """
    if mask is not None:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    q, k, v = split_heads(q, k, v, heads, skip_reshape)
    dtype = q.dtype
    if attn_precision == torch.float32 and dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    return merge_heads(F.scaled_dot_product_attention(q, k, v).to(dtype), skip_output_reshape)


def split_heads(q, k, v, heads: int, skip_reshape: bool):
    """ComfyUI's attention inputs ([b, tokens, heads*d], or already [b, heads, tokens, d]) as [b, heads, tokens, d]."""
    if skip_reshape:
        return q, k, v
    b, _, hd = q.shape
    return tuple(t.reshape(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))


def merge_heads(out, skip_output_reshape: bool):
    if skip_output_reshape:
        return out
    b, heads, _, d = out.shape
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def transformer_layers(unet) -> list[torch.nn.Module]:
    blocks = list(unet.input_blocks) + ([unet.middle_block] if unet.middle_block is not None else []) \
        + list(unet.output_blocks)
    return [layer for block in blocks for layer in block]


def checkpointable(layer: torch.nn.Module) -> bool:
    """Res blocks and transformers (as diffusers checkpoints resnets and transformer blocks); not samplers."""
    return any(True for _ in layer.parameters()) and type(layer).__name__ not in ("Upsample", "Downsample") \
        and not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))


class _CheckpointHandle:
    def __init__(self, layers):
        self.layers = layers

    def remove(self):
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.__dict__["forward"]
        self.layers = []


def _saved_ops() -> frozenset:
    """The ops whose outputs selective recompute keeps: convolutions, matrix products and fused attention (what
    costs compute to redo). Everything else (normalisations, activations, additions, casts, views) is redone."""
    aten = torch.ops.aten
    names = ("convolution", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


SAVED_OPS = _saved_ops()


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The ``context_fn`` of selective recompute (torch's selective activation checkpointing)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def enable_gradient_checkpointing(unet, *, selective: bool = False) -> _CheckpointHandle:
    """Checkpoint every res block and transformer layer of ``unet`` (non-reentrant; a per-instance
    ``forward`` so ComfyUI's isinstance dispatch in ``forward_timestep_embed`` still works).

    ``selective``: keep the outputs of :data:`SAVED_OPS` (convolutions, matrix products, attention) and recompute
    only the rest in backward: about a third less activation memory than no checkpointing (bk-small's structure),
    where full checkpointing recomputes every layer. Either way the recomputed values are those of the forward
    (the same ops on the same inputs), so the loss and the weights are the ones of no checkpointing."""
    patched = []
    context = {"context_fn": selective_context} if selective else {}
    for layer in transformer_layers(unet):
        if not checkpointable(layer) or "forward" in layer.__dict__:
            continue
        orig = layer.forward

        def fwd(*args, _orig=orig, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **context, **kwargs)
            return _orig(*args, **kwargs)

        layer.forward = fwd
        patched.append(layer)
    return _CheckpointHandle(patched)


class Taps:
    """Forward hooks that record feature outputs while ``recording`` is set (not during recomputation)."""

    def __init__(self, unet, paths: dict[str, str]):
        self.out: dict[str, torch.Tensor] = {}
        self.recording = False
        self.handles = []
        for name, path in paths.items():
            try:
                module = unet.get_submodule(path)
            except AttributeError as e:
                raise DistillError(f"the UNet has no module '{path}' for feature point {name}",
                                   "the model does not match its structure description; rebuild or reload it"
                                   ) from e
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if self.recording:
                self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.out = {}
