"""Conditional multi-expert convolution (CondConv; A-SDM's CLME-CondConv), host-free.

A ``CondConv2d`` holds ``K`` expert kernels and mixes them per sample, as in CondConv (Yang et al. 2019):

    r_b      = sigmoid(routing_weight @ mean_{h,w}(x_b) + routing_bias)          # [B, K], one gate per expert
    kernel_b = sum_k r_bk * weight[k]        bias_b = sum_k r_bk * bias[k]
    y_b      = conv2d(x_b, kernel_b, bias_b, stride, padding, dilation, groups)

The whole batch runs as ONE grouped convolution (``x`` reshaped to ``[1, B*Cin, H, W]``, the ``B`` mixed
kernels stacked, ``groups = B * groups``): no Python loop over samples. With the routing fixed
(``routing_override``), every sample shares one kernel and the module runs a plain ``F.conv2d`` on the
batch; with one expert and ``routing_override = 1`` that is ``F.conv2d`` with the expert's kernel, bit
for bit.

Parameters (and so the keys a file holds, under the module's path)::

    weight          [K, out, in/groups, kh, kw]   the experts (a 5-dim "weight": ComfyUI's own loader
                                                  refuses such a file with a size mismatch instead of
                                                  building a plain UNet from half of it)
    bias            [K, out]                      (absent when the replaced conv has none)
    routing_weight  [K, in]
    routing_bias    [K]

The routing parameters are the module's own (``routing_weight``, not a ``routing`` child module's
``weight``): ComfyUI's ModelPatcher manages only modules whose parameters are all their own
(``ModelPatcher._load_list`` skips "non leaf modules"), so a child module would leave the experts out of
lowvram loading, ``comfy_cast_weights`` and weight patching altogether. Extra own parameters next to
``weight``/``bias`` are what ComfyUI's scaled-fp8 Linear does too (``scale_weight``).

Weights are fetched through ``_cast_params(input)``, a context manager a host subclass overrides to use
ComfyUI's casting and offloading (``nodes/_condconv.py``).

**Initialisation (``from_conv``).** A-SDM (§2.3, Table 1) says only that expert 1 is inherited from the
teacher's convolution and the other experts are random, and that the 3x3 kernels of the teacher's
layers of a stage are "collected and combined" into the student's; it gives no routing and no rule
that keeps the student's function. The pack uses the *half-gate identity init*:

* routing weight 0 and routing bias 0, so ``r_k(x) = sigmoid(0) = 1/2`` for every input and expert;
* experts 2.. are the given kernels (the teacher's convolutions of the merged/removed layers), unchanged,
  then random kernels ``N(0, std(W)^2)`` (the replaced kernel's own scale) up to ``K``, with bias 0;
* expert 1 is ``2 W - sum_{k>1} W_k`` (bias ``2 b - sum_{k>1} b_k``), ``W, b`` the replaced conv's.

Then ``sum_k r_k W_k = (2W - sum W_k)/2 + (sum W_k)/2 = W`` for every input: the untrained module computes
exactly what the replaced conv computed (up to fp32 rounding: the rounding of expert 1 and of the mix),
and everything trains from the first step: ``dL/dW_k = r_k dL/dK = dL/dK / 2`` for every expert (no dead
expert), the gate gradient ``dL/dz_k = sigmoid'(0) <dL/dK_b, W_k> = <dL/dK_b, W_k> / 4`` is taken at the
sigmoid's steepest point, and ``dL/d routing_weight = dL/dz (x) pooled(x)`` is non-zero although the
weight starts at 0. Alternatives and why not:

* paper-literal (expert 1 = W verbatim, random experts, a randomly initialised router): the initial
  kernel ``sum_k r_k(x) W_k`` is not ``W`` and differs per input, so the student's output changes before
  any training and distillation first has to undo the noise;
* expert 1 = ``W / r``, other experts 0: identity too, but it throws away the teacher's kernels of the
  merged layers (the "cross-layer" point of CLME) and the zero experts' gates get no gradient at step 0;
* a saturated router (``r ~ (1, 0, ..)`` through large biases): only approximately the identity, and
  ``sigmoid'`` ~ 0 there, so the router barely learns;
* the compensation above with a random (non-zero) routing weight: ``r`` then depends on ``x``, so the
  mix equals ``W`` for no input;
* a residual form (``W + sum r_k dW_k``): identity with ``dW = 0``, but it is not CondConv's
  ``sum_k r_k W_k`` (another computation, another file layout).

The price of the chosen init: expert 1 is not the teacher's kernel verbatim but ``2W`` minus the other
experts (the teacher's kernel is what the *mix* equals at init), with a larger norm (``sqrt(5) std(W)``
against one random expert of the same scale), and a change ``d`` of gate 1 moves the kernel by
``d (2W - sum W_k)``. ``expert_sources`` records where each expert came from.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CondConv2d", "condconv_paths", "conv_geometry", "INIT_GATE", "PARAM_NAMES"]

INIT_GATE = 0.5  # sigmoid(0): every gate of an untrained (``from_conv``) module
PARAM_NAMES = ("weight", "bias", "routing_weight", "routing_bias")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def conv_geometry(conv: nn.Module) -> dict:
    """``stride, padding, dilation, groups`` of a ``torch.nn.Conv2d`` (ComfyUI's ops included), as keywords
    for ``CondConv2d`` / ``CondConv2d.from_conv``."""
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"CondConv2d supports zero padding only, not padding_mode={conv.padding_mode!r}")
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


class CondConv2d(nn.Module):
    """A 2-d convolution with ``num_experts`` kernels mixed per sample by a sigmoid router (see the module
    docstring). Same ``stride, padding, dilation, groups`` semantics as ``torch.nn.Conv2d`` (zero padding).

    ``routing_override``: ``None`` (learned routing) or a fixed gate for every sample, a number or ``K``
    numbers; used by tests and equivalence checks (one expert with ``routing_override = 1`` is exactly a
    ``Conv2d``). ``expert_sources``: one string per expert saying where its kernel came from.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be multiples of "
                             f"groups {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.num_experts = num_experts
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups,
                                               *self.kernel_size, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.routing_weight = nn.Parameter(torch.empty(num_experts, in_channels, **kw))
        self.routing_bias = nn.Parameter(torch.empty(num_experts, **kw))
        self.routing_override: float | Sequence[float] | torch.Tensor | None = None
        self.expert_sources: tuple[str, ...] = ("random",) * num_experts
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as ``torch.nn.Conv2d`` initialises its kernel; the router at the half gate (0, 0)."""
        with torch.no_grad():
            fan_in = self.weight[0].numel() // self.out_channels
            for k in range(self.num_experts):
                nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
            self.routing_weight.zero_()
            self.routing_bias.zero_()

    # ------------------------------------------------------------------ construction from kernels
    @classmethod
    def from_conv(cls, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None = None,
                  extra_kernels: Sequence[torch.Tensor] = (), *, num_experts: int | None = None,
                  generator: torch.Generator | None = None, extra_biases: Sequence[torch.Tensor | None] | None = None,
                  source: str = "replaced conv", extra_sources: Sequence[str] | None = None,
                  stride=1, padding=0, dilation=1, groups: int = 1, dtype: torch.dtype | None = None
                  ) -> CondConv2d:
        """A CondConv2d that computes exactly what ``conv2d(x, conv_weight, conv_bias, ...)`` computes, for
        every input, until it is trained (the half-gate identity init of the module docstring).

        ``extra_kernels`` (each of ``conv_weight``'s shape) become experts 2.., with ``extra_biases`` (or
        zero biases); random ``N(0, std(conv_weight)^2)`` experts drawn from ``generator`` fill up to
        ``num_experts`` (default: one expert more than the given kernels, i.e. no random expert).
        Geometry keywords as ``torch.nn.Conv2d`` (``conv_geometry(conv)`` gives them). The arithmetic runs
        in float64 and is stored in ``dtype`` (default ``conv_weight``'s).
        """
        if conv_weight.ndim != 4:
            raise ValueError(f"conv_weight must be a 4-dim conv kernel, got shape {tuple(conv_weight.shape)}")
        extra_kernels = list(extra_kernels)
        n_given = 1 + len(extra_kernels)
        K = n_given if num_experts is None else int(num_experts)
        if K < n_given:
            raise ValueError(f"num_experts={K} leaves no room for the replaced conv and {len(extra_kernels)} "
                             f"extra kernels (need at least {n_given})")
        if extra_biases is not None and len(extra_biases) != len(extra_kernels):
            raise ValueError(f"{len(extra_biases)} extra biases for {len(extra_kernels)} extra kernels")
        if extra_sources is not None and len(extra_sources) != len(extra_kernels):
            raise ValueError(f"{len(extra_sources)} extra sources for {len(extra_kernels)} extra kernels")
        shape = tuple(conv_weight.shape)
        for i, k in enumerate(extra_kernels):
            if tuple(k.shape) != shape:
                name = extra_sources[i] if extra_sources is not None else f"extra kernel {i}"
                raise ValueError(f"{name} has shape {tuple(k.shape)}, the replaced conv {shape}: "
                                 f"only kernels of the same shape can be experts")
        out_ch, in_per_group, kh, kw = shape
        dtype = dtype or conv_weight.dtype
        device = conv_weight.device
        m = cls(in_per_group * groups, out_ch, (kh, kw), K, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=conv_bias is not None, device=device, dtype=dtype)

        def stored(t: torch.Tensor) -> torch.Tensor:  # as it will be stored, back in float64
            return t.detach().to(device=device, dtype=dtype).to(torch.float64)

        W = conv_weight.detach().to(torch.float64)
        experts = [stored(k) for k in extra_kernels]
        n_random = K - n_given
        std = float(W.std()) if W.numel() > 1 else 0.0
        if not math.isfinite(std) or std == 0.0:
            std = 1.0 / math.sqrt(max(1, in_per_group * kh * kw))
        for _ in range(n_random):
            experts.append(stored(torch.randn(shape, generator=generator, dtype=torch.float64) * std))
        # expert 1 from the other experts as stored, so that its own rounding is the only one
        others = torch.stack(experts).sum(0) if experts else torch.zeros_like(W)
        weights = [W / INIT_GATE - others, *experts]  # 2W - sum of the others: the mix at r = 1/2 is W

        sources = [f"{source} (as 2*W - sum of the other experts)" if K > 1 else f"{source} (as 2*W)"]
        sources += list(extra_sources) if extra_sources is not None else [f"extra kernel {i}"
                                                                          for i in range(len(extra_kernels))]
        sources += [f"random N(0, {std:.3g}^2)"] * n_random
        with torch.no_grad():
            m.weight.copy_(torch.stack(weights).to(dtype))
            if conv_bias is not None:
                b = conv_bias.detach().to(device=device, dtype=torch.float64)
                biases = [torch.zeros_like(b) if eb is None else stored(eb)
                          for eb in (extra_biases or [None] * len(extra_kernels))]
                biases += [torch.zeros_like(b)] * n_random
                rest = torch.stack(biases).sum(0) if biases else torch.zeros_like(b)
                m.bias.copy_(torch.stack([b / INIT_GATE - rest, *biases]).to(dtype))
            m.routing_weight.zero_()
            m.routing_bias.zero_()
        m.expert_sources = tuple(sources)
        return m

    # ------------------------------------------------------------------ forward
    def _cast_params(self, input: torch.Tensor):
        """Context manager yielding ``(weight, bias, routing_weight, routing_bias)`` for a forward on
        ``input``; the tensors must stay valid until the context exits. Host subclasses override this
        (ComfyUI's casting and offloading); here the parameters are used as stored."""
        return contextlib.nullcontext((self.weight, self.bias, self.routing_weight, self.routing_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._cast_params(x) as (weight, bias, routing_weight, routing_bias):
            return self.conv_forward(x, weight, bias, routing_weight, routing_bias)

    def _mix_dtype(self, x: torch.Tensor) -> torch.dtype:
        # gates and mixed kernels in at least fp32 (fp16/bf16 inputs), then the conv in the input's dtype
        return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32

    def gates(self, x: torch.Tensor, routing_weight: torch.Tensor | None = None,
              routing_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The routing ``r`` for a batch, ``[B, K]``: sigmoid of a linear map of the globally pooled input
        (or ``routing_override`` expanded to the batch)."""
        dt = self._mix_dtype(x)
        if self.routing_override is not None:
            return self._override(x.device, dt).expand(x.shape[0], self.num_experts)
        rw = self.routing_weight if routing_weight is None else routing_weight
        rb = self.routing_bias if routing_bias is None else routing_bias
        pooled = x.mean(dim=(2, 3), dtype=dt)  # accumulates in dt without a full-size copy of x
        return torch.sigmoid(F.linear(pooled, rw.to(dt), rb.to(dt)))

    def _override(self, device, dtype) -> torch.Tensor:
        r = torch.as_tensor(self.routing_override, device=device, dtype=dtype).reshape(-1)
        if r.numel() == 1:
            r = r.expand(self.num_experts)
        if r.numel() != self.num_experts:
            raise ValueError(f"routing_override has {r.numel()} gates for {self.num_experts} experts")
        return r

    def conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     routing_weight: torch.Tensor, routing_bias: torch.Tensor) -> torch.Tensor:
        """The convolution with the given (already cast) parameters."""
        if x.ndim != 4:
            raise ValueError(f"CondConv2d expects [B, C, H, W] input, got shape {tuple(x.shape)}")
        dt = self._mix_dtype(x)
        K = self.num_experts
        if self.routing_override is not None:  # one kernel for the whole batch: a plain conv
            r = self._override(x.device, dt)
            if K == 1 and bool(r[0] == 1):  # bit-exact Conv2d
                kernel, kbias = weight[0], (None if bias is None else bias[0])
            else:
                kernel = (r.view(K, 1, 1, 1, 1) * weight.to(dt)).sum(0)
                kbias = None if bias is None else (r.view(K, 1) * bias.to(dt)).sum(0)
            kernel = kernel.to(x.dtype)
            kbias = None if kbias is None else kbias.to(x.dtype)
            return F.conv2d(x, kernel, kbias, self.stride, self.padding, self.dilation, self.groups)
        B, C, H, W = x.shape
        r = self.gates(x, routing_weight, routing_bias)  # [B, K]
        kernels = (r @ weight.to(dt).reshape(K, -1)).to(x.dtype)  # [B, out * in/g * kh * kw]
        kernels = kernels.reshape(B * self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        kbias = None if bias is None else (r @ bias.to(dt)).to(x.dtype).reshape(B * self.out_channels)
        y = F.conv2d(x.reshape(1, B * C, H, W), kernels, kbias, self.stride, self.padding, self.dilation,
                     self.groups * B)
        return y.reshape(B, self.out_channels, y.shape[-2], y.shape[-1])

    def mixed_kernel(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(sum_k r_k W_k, sum_k r_k b_k)`` for one gate vector ``[K]`` (reporting, export)."""
        r = gates.to(self.weight.dtype).reshape(1, self.num_experts)
        kernel = (r @ self.weight.reshape(self.num_experts, -1)).reshape(self.weight.shape[1:])
        return kernel, None if self.bias is None else (r @ self.bias)[0]

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def condconv_paths(state_dict: Mapping, prefix: str = "") -> dict[str, int]:
    """The CondConv modules in a state dict (tensors, or shapes), found structurally: a ``<path>.weight``
    with 5 dims next to a ``<path>.routing_weight``. Returns ``{path: number of experts}`` with ``prefix``
    removed from the paths (keys outside ``prefix`` are ignored)."""
    out: dict[str, int] = {}
    suffix = ".routing_weight"
    for key in state_dict:
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        path = key[: -len(suffix)]
        w = state_dict.get(path + ".weight")
        if w is None:
            continue
        shape = _shape(w)
        if len(shape) == 5 and _shape(state_dict[key])[:1] == shape[:1]:
            out[path[len(prefix):]] = shape[0]
    return out
