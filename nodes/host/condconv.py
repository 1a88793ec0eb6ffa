"""CondConv inside ComfyUI's UNet: the host subclass that casts and offloads like ``comfy.ops`` Conv2d,
and the swap of chosen convolutions of a ``UNetModel``.

``ComfyCondConv2d`` is ``models.patches.condconv.CondConv2d`` plus ComfyUI's ``CastWeightBiasOp`` contract, as
ComfyUI's own ``disable_weight_init.Conv2d`` / ``manual_cast.Conv2d``:

* ``comfy_cast_weights`` (copied from the conv it replaces, so ``manual_cast`` ops stay manual-cast),
  ``weight_function`` / ``bias_function``: when any is set, ``weight`` and ``bias`` go through
  ``comfy.ops.cast_bias_weight`` (to the input's dtype and device, LoRA-style weight functions applied;
  on ComfyUI versions with offload streams, through ``CastBiasWeightContext(..., offloadable=True)``
  so the stream is released after the convolution); ``routing_weight`` / ``routing_bias`` are cast to
  the input's dtype and device with ``comfy.model_management.cast_to`` (ComfyUI does not patch them).
  Otherwise the stored parameters are used as they are (the fast path ComfyUI's Conv2d takes).
* Every parameter is the module's own, so ``ModelPatcher`` treats it like any leaf op: full loads move
  it, lowvram loads leave it on the offload device and switch ``comfy_cast_weights`` on, patches on its
  ``weight`` / ``bias`` become ``LowVramPatch`` weight functions, and ComfyUI >= 0.33's dynamic loader
  stages ``weight`` / ``bias`` and force-loads the routing parameters (what it does with any extra own
  parameter). ``--cpu`` is the same code with the CPU as the only device.

``swap_condconv`` replaces given convolutions of a ``UNetModel`` in place (for a UNet the caller just
built, never one a received MODEL shares: clone-and-patch does not cover module swaps), and
``condconv_paths`` (re-exported from models) finds CondConv modules in a state dict.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import comfy.model_management
import comfy.ops
import torch

from ...models.patches.condconv import CondConv2d, conv_geometry
from ...models.structure.detect import condconv_paths

__all__ = ["ComfyCondConv2d", "swap_condconv", "condconv_paths", "stage_conv_paths"]

log = logging.getLogger("distilled_unets")

_CAST_CONTEXT = getattr(comfy.ops, "CastBiasWeightContext", None)  # ComfyUI with offload streams (0.33+)
_RUN_EVERY_OP = getattr(comfy.ops, "run_every_op", None)


class ComfyCondConv2d(CondConv2d, comfy.ops.CastWeightBiasOp):
    """CondConv2d that follows ComfyUI's weight casting and offloading (module docstring)."""

    comfy_cast_weights = False

    def reset_parameters(self) -> None:
        return None  # as comfy.ops: the weights come from a file or from ``from_module``

    def _comfy_casts(self) -> bool:
        return bool(self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0)

    @contextlib.contextmanager
    def _cast_params(self, input: torch.Tensor):
        if not self._comfy_casts():
            yield self.weight, self.bias, self.routing_weight, self.routing_bias
            return
        rw = comfy.model_management.cast_to(self.routing_weight, input.dtype, input.device)
        rb = comfy.model_management.cast_to(self.routing_bias, input.dtype, input.device)
        if _CAST_CONTEXT is not None:
            with _CAST_CONTEXT(self, input, offloadable=True) as (weight, bias):
                yield weight, bias, rw, rb
        else:
            weight, bias = comfy.ops.cast_bias_weight(self, input)
            yield weight, bias, rw, rb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _RUN_EVERY_OP is not None:
            _RUN_EVERY_OP()  # as ComfyUI's ops do on versions that have it (interrupt checks)
        if not self._comfy_casts():  # the stored parameters as they are: no context manager on the hot path
            return self.conv_forward(x, self.weight, self.bias, self.routing_weight, self.routing_bias)
        return super().forward(x)

    @classmethod
    def from_module(cls, m: CondConv2d, *, device=None, dtype=None, comfy_cast_weights: bool = False
                    ) -> ComfyCondConv2d:
        """A host copy of a (host-free) CondConv2d, its parameters cast to ``dtype`` on ``device``."""
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.num_experts, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                  device=device or m.weight.device, dtype=dtype or m.weight.dtype)
        with torch.no_grad():
            for name, p in m.named_parameters(recurse=False):
                getattr(new, name).copy_(p)
        new.routing_override = m.routing_override
        if "batch_mode" in vars(m):
            new.batch_mode = m.batch_mode
        new.expert_sources = tuple(m.expert_sources)
        new.comfy_cast_weights = comfy_cast_weights
        return new


def _cast_flag(conv: torch.nn.Module) -> bool:
    # a conv ModelPatcher has lowvram'd keeps its own flag in prev_comfy_cast_weights
    return bool(getattr(conv, "prev_comfy_cast_weights", getattr(conv, "comfy_cast_weights", False)))


def _check_fits(path: str, conv: torch.nn.Module, m: CondConv2d) -> None:
    geom = conv_geometry(conv)
    want = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                stride=tuple(geom["stride"]), padding=geom["padding"] if isinstance(geom["padding"], str)
                else tuple(geom["padding"]), dilation=tuple(geom["dilation"]), groups=geom["groups"],
                bias=conv.bias is not None)
    have = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), padding=m.padding, dilation=tuple(m.dilation), groups=m.groups,
                bias=m.bias is not None)
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        raise ValueError(f"CondConv for {path} does not fit the conv it replaces: "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))


def swap_condconv(diffusion_model: torch.nn.Module, modules: Mapping[str, CondConv2d | int | torch.nn.Conv2d]
                  ) -> dict[str, torch.nn.Module]:
    """Replace, in place, the ``Conv2d`` at each path (relative to ``diffusion_model``, e.g.
    ``input_blocks.1.0.in_layers.2``) with a ``ComfyCondConv2d``.

    A value is one of: a CondConv2d (copied onto the replaced conv's device and storage dtype; it must
    have the conv's geometry); a number of experts (an empty module of the conv's geometry, for a state
    dict to be loaded into next); a Conv2d an earlier swap returned (swapping it back). The new module
    keeps the replaced conv's ``comfy_cast_weights`` (manual cast stays manual cast). Returns
    ``{path: the module replaced}``; swapping those back restores the UNet. Call it on a UNet that no
    ModelPatcher has loaded (lowvram'd).
    """
    replaced: dict[str, torch.nn.Module] = {}
    for path, spec in modules.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = diffusion_model.get_submodule(parent_path) if parent_path else diffusion_model
            conv = getattr(parent, name)
        except AttributeError as e:
            raise KeyError(f"no module at {path!r} in the UNet") from e
        if isinstance(spec, torch.nn.Conv2d):  # swapping a replaced conv back
            if not isinstance(conv, CondConv2d):
                raise ValueError(f"{path} holds a {type(conv).__name__}, not a CondConv to swap back")
            new = spec
        elif not isinstance(conv, torch.nn.Conv2d):
            raise ValueError(f"{path} is a {type(conv).__name__}, not a Conv2d; CondConv replaces convolutions")
        elif isinstance(spec, CondConv2d):
            _check_fits(path, conv, spec)
            new = ComfyCondConv2d.from_module(spec, device=conv.weight.device, dtype=conv.weight.dtype,
                                              comfy_cast_weights=_cast_flag(conv))
        elif isinstance(spec, int) and not isinstance(spec, bool):
            new = ComfyCondConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, spec,
                                  bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
                                  **conv_geometry(conv))
            new.comfy_cast_weights = _cast_flag(conv)
        else:
            raise TypeError(f"{path}: expected a CondConv2d or a number of experts, got {type(spec).__name__}")
        setattr(parent, name, new)
        replaced[path] = conv
    return replaced


def stage_conv_paths(diffusion_model: torch.nn.Module, level: int = 0, *, down: bool = True, up: bool = True,
                     include_resample: bool = True, kernel_size: tuple[int, int] = (3, 3)) -> list[str]:
    """Paths (relative to a ComfyUI ``UNetModel``) of the ``kernel_size`` convolutions of the down and/or up
    stage at ``level`` (0 = the highest resolution): the resnets' convolutions and, with
    ``include_resample``, the stage's down/upsampler convolution; never the 1x1 skip convs or conv_in/out."""
    nrb = list(diffusion_model.num_res_blocks)
    levels = len(nrb)
    if not 0 <= level < levels:
        raise ValueError(f"level {level} outside the UNet's {levels} levels")
    blocks: list[str] = []
    if down:
        start = 1 + sum(n + 1 for n in nrb[:level])  # input_blocks: conv_in, then per level resnets (+ downsample)
        count = nrb[level] + (1 if level < levels - 1 and include_resample else 0)
        blocks += [f"input_blocks.{i}" for i in range(start, start + count)]
    if up:
        start = sum(n + 1 for n in nrb[level + 1:])  # output_blocks run from the deepest level
        blocks += [f"output_blocks.{i}" for i in range(start, start + nrb[level] + 1)]
    paths = []
    for b in blocks:
        block = diffusion_model.get_submodule(b)
        for name, m in block.named_modules():
            if not isinstance(m, torch.nn.Conv2d) or tuple(m.kernel_size) != tuple(kernel_size):
                continue
            if not include_resample and (name.endswith(".op") or name.endswith(".conv")):
                continue
            paths.append(f"{b}.{name}")
    return paths
