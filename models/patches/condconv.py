"""Conditional multi-expert convolution (CondConv; A-SDM's CLME-CondConv), host-free.

A ``CondConv2d`` holds ``K`` expert kernels and mixes them per sample, as in CondConv (Yang et al. 2019):

    r_b      = sigmoid(routing_weight @ mean_{h,w}(x_b) + routing_bias)          # [B, K], one gate per expert
    kernel_b = sum_k r_bk * weight[k]        bias_b = sum_k r_bk * bias[k]
    y_b      = conv2d(x_b, kernel_b, bias_b, stride, padding, dilation, groups)

**Speed** (``conv_forward``; ``device_ops`` counts a call's device ops with ``torch.profiler``). Routing and
mixing are five device ops whatever the dtype: the pooling (one reduction), the linear map, the sigmoid, one
matmul mixing the kernels and one mixing the biases. The gates and the mix run in the input's dtype when input
and parameters are both fp16 or both bf16: a half-precision matmul multiplies and accumulates in fp32 and
rounds once, so it *is* the fp32 mix cast once, with no cast of the expert stack (``mix_dtype``); otherwise
in at least fp32, cast once to the input's dtype. Then, for a batch of ``B``:

* one routing for the whole batch (``B = 1``; a ``routing_override``; on the CPU, outside autograd, every
  row's gates equal, as at init): one mixed kernel and ONE plain ``F.conv2d`` on the batch, the very kernel
  the replaced conv runs (with one expert and ``routing_override = 1``, ``F.conv2d`` with the expert's
  kernel, bit for bit). The equal-rows check stays off the GPU: it needs a device-to-host sync, dearer in a
  launch-bound step than what it saves;
* rows routed differently, by ``batch_mode`` (``"auto"``: ``auto_batch_mode``): ``"per_sample"`` (one matmul
  mixes the ``B`` kernels, then ``B`` plain convolutions and a concatenation: the plain conv's FLOPs, ``B``
  launches), ``"grouped"`` (one grouped convolution, ``x`` as ``[1, B*Cin, H, W]`` and ``groups = B *
  groups``: one launch, but GPU grouped-conv kernels with hundreds of channels per group run well below the
  plain conv), ``"expert_sum"`` (``conv(x, sum_k r_k W_k) = sum_k r_k conv(x, W_k)``: one convolution with
  all ``K * out`` expert channels, the biases included, then one batched matmul of the gates: the fewest
  launches, ``K`` times the FLOPs; ``groups = 1`` only).

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
ComfyUI's casting and offloading (``nodes/host/condconv.py``).

**Initialisation (``from_conv``).** A-SDM (§2.3, Table 1) says only that expert 1 is inherited from the
teacher's convolution and the other experts are random, and that the 3x3 kernels of the teacher's
layers of a stage are "collected and combined" into the student's; it gives no routing and no rule
that keeps the student's function. The pack uses the *half-gate identity init*:

* routing weight 0 and routing bias 0, so ``r_k(x) = sigmoid(0) = 1/2`` for every input and expert;
* experts 2.. are the given kernels (the teacher's convolutions of the merged/removed layers), unchanged
  (in half precision: see "Exact in half precision" below), then random kernels ``N(0, std(W)^2)`` (the
  replaced kernel's own scale) up to ``K``, with bias 0;
* expert 1 is ``2 W - sum_{k>1} W_k`` (bias ``2 b - sum_{k>1} b_k``), ``W, b`` the replaced conv's.

Then ``sum_k r_k W_k = (2W - sum W_k)/2 + (sum W_k)/2 = W`` for every input: the untrained module computes
exactly what the replaced conv computed (in fp32 up to the rounding of expert 1; bit for bit in fp16/bf16),
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

**Exact in half precision.** In fp32 the identity holds up to one rounding of expert 1 (a few 1e-8 of a
kernel's scale). In fp16/bf16 that rounding is as large as the format's own, and it is not a matter of
mixing in fp32: where ``|W_k| >> |W|``, ``2W - W_k`` needs more bits than the format has, so no mix of the
stored experts can give ``W`` there. ``from_conv`` therefore builds the experts in the dtype they are stored
in (``dtype``) so that they sum to ``2W`` exactly: the fp32 mix at gate 1/2 is then ``W`` bit for bit and
the untrained student computes exactly what the plain one computes. For that, each inherited or random
expert moves where it must (``_compensate``): by one rounding step where that suffices (about 45 % of the
values), else, where ``|W_k| >> |W|`` (about 12 %), to a value between 0 and ``2W``; ``expert_sources``
says how much moved. Considered instead: a *W-centred split* (every expert ``W`` plus zero-mean deltas,
``W + D`` and ``W - D``): exact only where ``W + D`` and ``W - D`` are both representable, the same
condition, so it needs the same moves and drops the teacher's kernels; with ``D = 0`` (every expert ``W``)
it is exact in every dtype but the experts stay identical under training unless the router starts random
and antisymmetric, i.e. no cross-layer kernels at all. A student built in fp32 and cast to half precision
afterwards keeps the identity only up to that cast's rounding (each expert rounded on its own); built from
a half-precision teacher (ComfyUI's GPU default) it is exact.

The price of the chosen init: expert 1 is not the teacher's kernel verbatim but ``2W`` minus the other
experts (the teacher's kernel is what the *mix* equals at init), with a larger norm (``sqrt(5) std(W)``
against one random expert of the same scale), and a change ``d`` of gate 1 moves the kernel by
``d (2W - sum W_k)``. ``expert_sources`` records where each expert came from.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CondConv2d", "auto_batch_mode", "conv_geometry", "device_ops", "mix_dtype", "BATCH_MODES",
           "INIT_GATE", "PARAM_NAMES"]

INIT_GATE = 0.5  # sigmoid(0): every gate of an untrained (``from_conv``) module
PARAM_NAMES = ("weight", "bias", "routing_weight", "routing_bias")
BATCH_MODES = ("auto", "per_sample", "grouped", "expert_sum")
_HALF = (torch.float16, torch.bfloat16)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch < 2.3: never


def mix_dtype(input_dtype: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the gates and the expert mix are computed in: the input's when input and parameters are
    both fp16 or both bf16 (the matmuls then multiply and accumulate in fp32 and round once: the fp32 mix at
    no extra kernel), else at least fp32."""
    if input_dtype == param_dtype and input_dtype in _HALF:
        return input_dtype
    d = torch.promote_types(input_dtype, param_dtype) if param_dtype.is_floating_point else input_dtype
    return torch.promote_types(d, torch.float32) if d.is_floating_point else torch.float32


def auto_batch_mode(device_type: str, batch: int, num_experts: int) -> str:
    """The ``batch_mode`` ``"auto"`` picks for a batch whose rows are routed differently (module docstring,
    "Speed"): on the CPU one grouped convolution (oneDNN runs it as fast as one plain convolution per sample:
    docs/benchmarks.md, full-width tiny-sd, batch 2-8; one call instead of ``B``); elsewhere one plain
    convolution per sample (the plain conv's FLOPs and kernels; cuDNN's grouped convolutions with hundreds of
    channels per group ran about 1.7x slower on an H100, ``expert_sum`` costs ``num_experts`` times the FLOPs).
    ``bench/bench_condconv.py`` times all three on its device."""
    return "grouped" if device_type == "cpu" else "per_sample"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def conv_geometry(conv: nn.Module) -> dict:
    """``stride, padding, dilation, groups`` of a ``torch.nn.Conv2d`` (ComfyUI's ops included), as keywords
    for ``CondConv2d`` / ``CondConv2d.from_conv``."""
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"CondConv2d supports zero padding only, not padding_mode={conv.padding_mode!r}")
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _compensate(target: torch.Tensor, others: list[torch.Tensor], dtype: torch.dtype
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[float, float]]]:
    """Expert 1 of the half-gate init, ``target - sum(others)``, from float64 tensors holding values of
    ``dtype``; returns ``(first, others, moves)``, ``moves``: per other expert, the fractions of its values
    moved by a rounding step and moved further.

    fp32/fp64: the others stay verbatim and ``first`` is rounded once (the mix is ``W`` within that rounding).
    fp16/bf16: that one rounding is as large as the format's own, so the experts are made to sum to ``target``
    EXACTLY and the fp32 mix at gate 1/2 is ``W`` bit for bit. Each other expert in turn moves, where it must,
    to the nearest value that leaves a representable remainder ``t - other`` (``t``: ``target`` less the
    experts before it; ``first`` is the last remainder): by its rounding step (a unit or two in the last place)
    where that suffices, else (where ``|other| >> |t|``: the remainder would need more bits than the format
    has) to a value between ``0`` and ``2t``.
    """
    if dtype not in _HALF:
        rest = torch.stack(others).sum(0) if others else 0
        return (target - rest).to(dtype).to(torch.float64), others, [(0.0, 0.0)] * len(others)

    def as_stored(x):
        return x.to(dtype).to(torch.float64)

    t = as_stored(target)  # the remainder still to make (target is representable: 2 W, W as stored)
    new, moves = [], []
    for o in others:
        lim = torch.stack([torch.zeros_like(t), 2 * t])
        near = as_stored(torch.minimum(torch.maximum(o, lim.min(0).values), lim.max(0).values))
        cands = torch.stack([o, t - as_stored(t - o), near, torch.zeros_like(t)])  # 0 always works
        ok = (as_stored(cands) == cands) & (as_stored(t - cands) == t - cands)
        dist = torch.where(ok, (cands - o).abs(), torch.full_like(t, math.inf))
        pick = dist.argmin(0, keepdim=True)
        o_new = cands.gather(0, pick)[0]
        stepped, far = (o_new != o) & (pick[0] == 1), (o_new != o) & (pick[0] > 1)
        moves.append((float(stepped.double().mean()), float(far.double().mean())))
        new.append(o_new)
        t = t - o_new
    return t, new, moves


class CondConv2d(nn.Module):
    """A 2-d convolution with ``num_experts`` kernels mixed per sample by a sigmoid router (see the module
    docstring). Same ``stride, padding, dilation, groups`` semantics as ``torch.nn.Conv2d`` (zero padding).

    ``routing_override``: ``None`` (learned routing) or a fixed gate for every sample, a number or ``K``
    numbers; used by tests and equivalence checks (one expert with ``routing_override = 1`` is exactly a
    ``Conv2d``). ``expert_sources``: one string per expert saying where its kernel came from.
    """

    #: how a batch whose rows are routed differently runs: "auto" or one of BATCH_MODES[1:] (module docstring,
    #: "Speed"); a class default, set on an instance to override
    batch_mode: str = "auto"

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
        in float64 on the kernels as stored in ``dtype`` (default ``conv_weight``'s); in fp16/bf16 the stored
        experts sum to ``2 W`` exactly (module docstring, "Exact in half precision"): pass the dtype the
        module will run in.
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

        W = stored(conv_weight)  # the replaced kernel as a plain conv stored in ``dtype`` holds it
        experts = [stored(k) for k in extra_kernels]
        n_random = K - n_given
        std = float(W.std()) if W.numel() > 1 else 0.0
        if not math.isfinite(std) or std == 0.0:
            std = 1.0 / math.sqrt(max(1, in_per_group * kh * kw))
        for _ in range(n_random):
            experts.append(stored(torch.randn(shape, generator=generator, dtype=torch.float64) * std))
        first, experts, moved = _compensate(W / INIT_GATE, experts, dtype)  # 2W - the others: the mix at 1/2 is W

        sources = [f"{source} (as 2*W - sum of the other experts)" if K > 1 else f"{source} (as 2*W)"]
        sources += list(extra_sources) if extra_sources is not None else [f"extra kernel {i}"
                                                                          for i in range(len(extra_kernels))]
        sources += [f"random N(0, {std:.3g}^2)"] * n_random
        for i, (stepped, far) in enumerate(moved, start=1):
            if stepped or far:
                sources[i] += (f" (for an exact identity in {str(dtype)[6:]}: {stepped:.1%} of its values moved by a "
                               f"rounding step, {far:.1%} further)")
        with torch.no_grad():
            m.weight.copy_(torch.stack([first, *experts]).to(dtype))
            if conv_bias is not None:
                b = stored(conv_bias)
                biases = [torch.zeros_like(b) if eb is None else stored(eb)
                          for eb in (extra_biases or [None] * len(extra_kernels))]
                biases += [torch.zeros_like(b)] * n_random
                b_first, biases, _ = _compensate(b / INIT_GATE, biases, dtype)
                m.bias.copy_(torch.stack([b_first, *biases]).to(dtype))
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

    def gates(self, x: torch.Tensor, routing_weight: torch.Tensor | None = None,
              routing_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The routing ``r`` for a batch, ``[B, K]``: sigmoid of a linear map of the globally pooled input
        (or ``routing_override`` expanded to the batch), in the mixing dtype (``mix_dtype``)."""
        rw = self.routing_weight if routing_weight is None else routing_weight
        rb = self.routing_bias if routing_bias is None else routing_bias
        md = mix_dtype(x.dtype, rw.dtype)
        if self.routing_override is not None:
            return self._override(x.device, md).expand(x.shape[0], self.num_experts)
        # three kernels: the pooling (one reduction, fp32 accumulation for half inputs), the linear map, the sigmoid
        return torch.sigmoid(F.linear(x.mean(dim=(2, 3), dtype=md), rw.to(md), rb.to(md)))

    def _override(self, device, dtype) -> torch.Tensor:
        r = torch.as_tensor(self.routing_override, device=device, dtype=dtype).reshape(-1)
        if r.numel() == 1:
            r = r.expand(self.num_experts)
        if r.numel() != self.num_experts:
            raise ValueError(f"routing_override has {r.numel()} gates for {self.num_experts} experts")
        return r

    def batch_path(self, x: torch.Tensor, r: torch.Tensor) -> str:
        """How a batch with gates ``r`` ``[B, K]`` runs: ``"one"`` when one routing serves the whole batch (one
        mixed kernel, one plain ``F.conv2d``), else the ``batch_mode`` (``"auto"``: ``auto_batch_mode``)."""
        B = x.shape[0]
        if B == 1 or self.routing_override is not None:
            return "one"
        # every row routed alike: checked only where that is free (the CPU: no device sync) and without autograd
        # (a shared kernel would hand every row's gate gradient to row 0)
        if (x.device.type == "cpu" and not (r.requires_grad and torch.is_grad_enabled())
                and not _compiling() and bool((r == r[:1]).all())):
            return "one"
        mode = self.batch_mode
        if mode == "auto":
            mode = auto_batch_mode(x.device.type, B, self.num_experts)
        if mode not in BATCH_MODES[1:]:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {mode!r}")
        return "per_sample" if mode == "expert_sum" and self.groups != 1 else mode

    def conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     routing_weight: torch.Tensor, routing_bias: torch.Tensor) -> torch.Tensor:
        """The convolution with the given (already cast) parameters."""
        if x.ndim != 4:
            raise ValueError(f"CondConv2d expects [B, C, H, W] input, got shape {tuple(x.shape)}")
        cdt = x.dtype
        md = mix_dtype(cdt, routing_weight.dtype)
        if self.routing_override is None:  # gates() inlined: this is the hot path of a launch-bound step
            if routing_weight.dtype != md:
                routing_weight, routing_bias = routing_weight.to(md), routing_bias.to(md)
            r = torch.sigmoid(F.linear(x.mean(dim=(2, 3), dtype=md), routing_weight, routing_bias))
        else:
            r = self._override(x.device, md).expand(x.shape[0], self.num_experts)
        B = x.shape[0]
        path = "one" if B == 1 else self.batch_path(x, r)
        K, out = self.num_experts, self.out_channels
        shape = (out, self.in_channels // self.groups, *self.kernel_size)
        if weight.dtype != md:
            weight, bias = weight.to(md), None if bias is None else bias.to(md)
        if path == "one":  # one kernel for the batch: the plain convolution, as the replaced conv ran it
            r1 = r if B == 1 else r[:1]
            kernel = torch.mm(r1, weight.reshape(K, -1)).view(shape)
            kbias = None if bias is None else torch.mm(r1, bias).view(out)
            if md != cdt:
                kernel, kbias = kernel.to(cdt), None if kbias is None else kbias.to(cdt)
            return F.conv2d(x, kernel, kbias, self.stride, self.padding, self.dilation, self.groups)
        C, H, W = x.shape[1:]
        if path == "expert_sum":  # linear in the kernel: sum_k r_k conv(x, W_k) = conv(x, sum_k r_k W_k)
            y = F.conv2d(x, weight.reshape(K * out, *shape[1:]).to(cdt),
                         None if bias is None else bias.reshape(K * out).to(cdt), self.stride, self.padding,
                         self.dilation, 1)
            h, w = y.shape[-2:]
            return torch.bmm(r.to(cdt).view(B, 1, K), y.view(B, K, out * h * w)).view(B, out, h, w)
        kernels = torch.mm(r, weight.reshape(K, -1)).to(cdt)  # [B, out * in/g * kh * kw]
        kbias = None if bias is None else torch.mm(r, bias).to(cdt)
        if path == "per_sample":
            kernels = kernels.view(B, *shape)
            return torch.cat([F.conv2d(x[i:i + 1], kernels[i], None if kbias is None else kbias[i], self.stride,
                                       self.padding, self.dilation, self.groups) for i in range(B)])
        # grouped: the batch as one convolution with B * groups groups
        y = F.conv2d(x.reshape(1, B * C, H, W), kernels.view(B * out, *shape[1:]),
                     None if kbias is None else kbias.reshape(B * out), self.stride, self.padding, self.dilation,
                     self.groups * B)
        return y.view(B, out, y.shape[-2], y.shape[-1])

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


# ops that only make views, aliases or empty tensors: no kernel on any device
_NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "expand", "slice", "select", "as_strided", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "detach", "alias", "to", "lift_fresh", "resolve_conj", "resolve_neg",
    "contiguous", "empty", "empty_strided", "split", "unbind", "chunk", "narrow", "flatten", "unflatten",
    "promote_types", "result_type", "size", "stride", "dim", "is_floating_point", "is_same_size", "dropout"))


def device_ops(fn, *args, **kwargs) -> list[str]:
    """The ops of one call of ``fn(*args, **kwargs)`` that do device work, by ``torch.profiler`` on any device: the
    top-level aten ops whose call tree holds anything but views, aliases and allocations (a no-op ``.to`` or a
    ``reshape`` of a contiguous tensor is left out, a real cast or copy counted). On a GPU each launches at least
    one kernel, so their number is what a launch-bound step pays per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)

    def works(evt) -> bool:
        return evt.name not in _NO_KERNEL or any(works(c) for c in evt.cpu_children)

    return [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::") and works(e)]
