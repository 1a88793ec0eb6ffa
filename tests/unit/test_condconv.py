"""CondConv (models/patches/condconv.py): against an independent slow reference (every batch path), exactness, the
identity init (bit for bit in fp16/bf16), gradients, the device-op count of a call, construction errors and the
structural key finder."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from distilled_unets.models.patches.condconv import (
    BATCH_MODES,
    INIT_GATE,
    CondConv2d,
    conv_geometry,
    device_ops,
    mix_dtype,
)
from distilled_unets.models.structure.detect import condconv_paths

HALF = [torch.float16, torch.bfloat16]


def _randomise(m: CondConv2d, seed: int, routing_scale: float = 2.0) -> None:
    """Random experts and a random router, so that every sample gets its own gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.weight, m.bias):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() / m.out_channels) ** 0.5)
        m.routing_weight.copy_(routing_scale * torch.randn(m.routing_weight.shape, generator=g))
        m.routing_bias.copy_(torch.randn(m.routing_bias.shape, generator=g))


def _reference(m: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    """Slow CondConv from the definition, in float64: per sample, the gates from the pooled input, the
    weighted sum of the expert kernels and biases (a loop over experts), then one F.conv2d."""
    x = x.double()
    W, rw, rb = m.weight.double(), m.routing_weight.double(), m.routing_bias.double()
    b = None if m.bias is None else m.bias.double()
    outs = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        pooled = xi.sum(dim=(2, 3))[0] / (xi.shape[2] * xi.shape[3])
        gates = [1.0 / (1.0 + torch.exp(-(rw[k] * pooled).sum() - rb[k])) for k in range(m.num_experts)]
        kernel = sum(gates[k] * W[k] for k in range(m.num_experts))
        bias = None if b is None else sum(gates[k] * b[k] for k in range(m.num_experts))
        outs.append(F.conv2d(xi, kernel, bias, m.stride, m.padding, m.dilation, m.groups))
    return torch.cat(outs)


CASES = [  # in, out, kernel, K, stride, padding, dilation, groups, bias, H, W
    (8, 16, 3, 2, 1, 1, 1, 1, True, 12, 12),
    (8, 8, 3, 3, 2, 1, 1, 1, True, 13, 9),       # stride 2 on an odd, non-square grid
    (8, 12, 3, 4, 1, 2, 2, 2, False, 11, 11),    # dilation, groups, no bias
    (12, 12, 1, 2, 1, 0, 1, 3, True, 7, 10),     # 1x1, groups 3
    (8, 16, (3, 1), 2, (2, 1), (1, 0), 1, 4, True, 9, 8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"in{c[0]}-out{c[1]}-K{c[3]}-s{c[4]}-g{c[7]}")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", BATCH_MODES)
def test_matches_slow_reference(case, seed, mode):
    """Every batch path equals the per-sample definition: exactly (float64, <= 1e-12 relative), and in float32
    within float32's own rounding of the mix and the convolution (over 200 random draws per case the float32
    error against the float64 definition reaches 0.9-2.0e-6 of the largest output; expert_sum sums the K
    experts' outputs instead of mixing their kernels, the same order of rounding)."""
    cin, cout, k, K, s, p, d, g, bias, H, W = case
    m = CondConv2d(cin, cout, k, K, stride=s, padding=p, dilation=d, groups=g, bias=bias)
    m.batch_mode = mode
    _randomise(m, seed=zlib.crc32(repr((case, seed)).encode()) % 1000)  # the same draws in every process
    x = torch.randn(5, cin, H, W, generator=torch.Generator().manual_seed(7 + seed))
    x = x + torch.arange(5.0).view(5, 1, 1, 1)  # different pooled inputs, so different routings
    gates = m.gates(x)
    assert gates.shape == (5, K)
    assert (gates.max(0).values - gates.min(0).values).min() > 1e-2, "samples should be routed differently"
    want = mode if mode != "auto" else ("grouped" if torch.device("cpu").type == "cpu" else "per_sample")
    assert m.batch_path(x, gates) == ("per_sample" if want == "expert_sum" and g != 1 else want)
    with torch.no_grad():
        y = m(x)
        y64 = m.double()(x.double())
    ref = _reference(m, x)
    scale = max(1.0, ref.abs().max().item())
    assert y64.dtype == torch.float64 and (y64 - ref).abs().max() <= 1e-12 * scale
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y.double() - ref).abs().max() <= 4e-6 * scale


def test_batch_of_one_equals_batch():
    m = CondConv2d(8, 8, 3, 3, padding=1)
    _randomise(m, 3)
    x = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(1)) * torch.arange(1.0, 5.0).view(4, 1, 1, 1)
    with torch.no_grad():
        full = m(x)
        single = torch.cat([m(x[i:i + 1]) for i in range(4)])
    assert (full - single).abs().max() <= 1e-5


@pytest.mark.parametrize("geom", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2, groups=4),
                                  dict(groups=2, stride=(1, 2), padding=(0, 1))])
def test_one_expert_fixed_routing_is_conv2d_exactly(geom):
    m = CondConv2d(8, 16, 3, 1, **geom)
    _randomise(m, 5)
    m.routing_override = 1.0
    x = torch.randn(3, 8, 10, 11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = m(x)
        ref = F.conv2d(x, m.weight[0], m.bias[0], m.stride, m.padding, m.dilation, m.groups)
    assert torch.equal(y, ref)


def test_fixed_routing_mixes_the_experts():
    m = CondConv2d(8, 8, 3, 3, padding=1)
    _randomise(m, 6)
    m.routing_override = [0.2, 0.5, 0.9]
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(4))
    kernel, bias = m.mixed_kernel(torch.tensor([0.2, 0.5, 0.9]))
    with torch.no_grad():
        assert (m(x) - F.conv2d(x, kernel, bias, padding=1)).abs().max() <= 1e-5
    m.routing_override = [1.0, 0.0]
    with pytest.raises(ValueError, match="3 experts"):
        m(x)


def _teacher(seed=0, cin=16, cout=24, k=3):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    extras = [torch.randn(conv.weight.shape, generator=g) * 0.1 for _ in range(2)]
    extra_b = [torch.randn(cout, generator=g) * 0.1, None]
    return conv, extras, extra_b


@pytest.mark.parametrize("K,n_extra", [(1, 0), (2, 0), (2, 1), (4, 2)])
def test_identity_at_init(K, n_extra):
    conv, extras, extra_b = _teacher()
    m = CondConv2d.from_conv(conv.weight, conv.bias, extras[:n_extra], extra_biases=extra_b[:n_extra],
                             num_experts=K, generator=torch.Generator().manual_seed(9),
                             extra_sources=[f"teacher conv {i}" for i in range(n_extra)], **conv_geometry(conv))
    assert m.num_experts == K and len(m.expert_sources) == K
    assert m.expert_sources[1:1 + n_extra] == tuple(f"teacher conv {i}" for i in range(n_extra))
    assert all(s.startswith("random") for s in m.expert_sources[1 + n_extra:])
    for i in range(n_extra):  # the teacher's extra kernels are kept as they are
        assert torch.equal(m.weight[1 + i], extras[i])
    g = torch.Generator().manual_seed(11)
    for trial in range(3):
        x = torch.randn(3, 16, 9, 12, generator=g) * (1 + trial) + trial
        assert torch.equal(m.gates(x), torch.full((3, K), INIT_GATE))
        with torch.no_grad():
            y, ref = m(x), conv(x)
        assert (y - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_from_conv_without_bias_and_default_expert_count():
    conv, extras, _ = _teacher()
    m = CondConv2d.from_conv(conv.weight, None, extras, padding=1)
    assert m.num_experts == 3 and m.bias is None
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (m(x) - F.conv2d(x, conv.weight, None, padding=1)).abs().max() <= 1e-5


def test_gradients_reach_every_expert_and_the_router():
    conv, extras, extra_b = _teacher()
    m = CondConv2d.from_conv(conv.weight, conv.bias, extras[:1], extra_biases=extra_b[:1], num_experts=3,
                             generator=torch.Generator().manual_seed(1), padding=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 8, 8, generator=g) + torch.arange(4.0).view(4, 1, 1, 1)
    loss = (m(x) * torch.randn(4, 24, 8, 8, generator=g)).sum()
    loss.backward()
    for k in range(3):
        assert m.weight.grad[k].abs().sum() > 0, f"expert {k} gets no kernel gradient"
        assert m.bias.grad[k].abs().sum() > 0, f"expert {k} gets no bias gradient"
        assert m.routing_weight.grad[k].abs().sum() > 0, f"gate {k} gets no routing-weight gradient"
        assert m.routing_bias.grad[k].abs() > 0, f"gate {k} gets no routing-bias gradient"
    # at the half gate every expert sees half the mixed kernel's gradient
    assert torch.allclose(m.weight.grad[0], m.weight.grad[2])


def test_from_conv_rejects_bad_kernels():
    conv, extras, _ = _teacher()
    with pytest.raises(ValueError, match="teacher up.1 has shape"):
        CondConv2d.from_conv(conv.weight, conv.bias, [torch.zeros(24, 8, 3, 3)], extra_sources=["teacher up.1"])
    with pytest.raises(ValueError, match="leaves no room"):
        CondConv2d.from_conv(conv.weight, conv.bias, extras, num_experts=2)
    with pytest.raises(ValueError, match="4-dim"):
        CondConv2d.from_conv(conv.weight[0], conv.bias)
    with pytest.raises(ValueError, match="padding_mode"):
        conv_geometry(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_half_precision_input_mixes_in_fp32():
    m = CondConv2d(8, 8, 3, 2, padding=1)
    _randomise(m, 8)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    m_bf = CondConv2d(8, 8, 3, 2, padding=1).to(torch.bfloat16)
    m_bf.load_state_dict(m.state_dict())
    with torch.no_grad():
        y = m_bf(x.bfloat16())
        ref = _reference(m_bf, x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_state_dict_keys_and_condconv_paths():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), CondConv2d(8, 8, 3, 2), torch.nn.Sequential(
        CondConv2d(8, 4, 1, 3, bias=False)))
    sd = net.state_dict()
    assert set(sd) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.routing_weight", "1.routing_bias",
                       "2.0.weight", "2.0.routing_weight", "2.0.routing_bias"}
    assert sd["1.weight"].shape == (2, 8, 8, 3, 3) and sd["1.routing_weight"].shape == (2, 8)
    assert condconv_paths(sd) == {"1": 2, "2.0": 3}
    prefixed = {"model.diffusion_model." + k: tuple(v.shape) for k, v in sd.items()}  # shapes work too
    assert condconv_paths(prefixed, prefix="model.diffusion_model.") == {"1": 2, "2.0": 3}
    assert condconv_paths({"x.weight": torch.zeros(8, 8, 3, 3), "x.routing_weight": torch.zeros(2, 8)}) == {}


# ---------------------------------------------------------------- one routing for the batch, autograd, device ops


def test_one_routing_runs_the_plain_convolution_and_keeps_row_gradients():
    """A batch routed alike (here: the untrained router) runs one F.conv2d with the mixed kernel, bit for bit;
    under autograd the rows keep their own gate gradients (no shared kernel): the routing-weight gradient of the
    batch equals the sum of the per-sample ones."""
    conv, extras, extra_b = _teacher()
    m = CondConv2d.from_conv(conv.weight, conv.bias, extras[:1], extra_biases=extra_b[:1], padding=1)
    x = torch.randn(3, 16, 7, 7, generator=torch.Generator().manual_seed(2)) + torch.arange(3.0).view(3, 1, 1, 1)
    with torch.no_grad():
        r = m.gates(x)
        assert m.batch_path(x, r) == "one"
        kernel, bias = m.mixed_kernel(r[0])
        assert torch.equal(m(x), F.conv2d(x, kernel, bias, padding=1))
    assert m.batch_path(x[:1], r[:1]) == "one"
    w = torch.linspace(-1, 1, 3 * 24 * 49).view(3, 24, 7, 7)
    with torch.enable_grad():
        assert m.batch_path(x, m.gates(x)) == "grouped"  # no shortcut under autograd
        m.zero_grad()
        (m(x) * w).sum().backward()
        batch = m.routing_weight.grad.clone()
        per = torch.zeros_like(batch)
        for i in range(3):
            m.zero_grad()
            (m(x[i:i + 1]) * w[i:i + 1]).sum().backward()
            per += m.routing_weight.grad
    assert batch.abs().max() > 0 and torch.allclose(batch, per, rtol=1e-5, atol=1e-7)


def _ops(m, x):
    with torch.inference_mode():
        return device_ops(m, x)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_device_ops_of_a_call(dtype):
    """The launch count a call pays, pinned (torch.profiler, aten ops that do device work): routing and mixing in
    at most 5 ops in every dtype (no cast of the expert stack for half precision: before, 11), the plain conv 1;
    rows routed differently: + the CPU's equal-rows check (3) and the path's own convs / concatenation."""
    m = CondConv2d(16, 16, 3, 2, padding=1).to(dtype)
    _randomise(m, 4)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(dtype)
    x = (torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 5.0).view(4, 1, 1, 1)
         ).to(dtype)
    assert _ops(conv, x[:1]) == ["aten::conv2d"]
    one = _ops(m, x[:1])
    assert len(one) <= 6 and one.count("aten::conv2d") == 1 and "aten::to" not in one, one
    check = 3  # eq, all, is_nonzero: the CPU's equal-rows test
    for mode, most in (("grouped", 6), ("per_sample", 6 + 4 + 1 - 1), ("expert_sum", 5)):
        m.batch_mode = mode
        ops = _ops(m, x)
        assert len(ops) <= most + check and "aten::to" not in ops, (mode, ops)
    m.routing_weight.data.zero_()  # rows routed alike: the plain path again
    m.batch_mode = "per_sample"
    assert _ops(m, x).count("aten::conv2d") == 1


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_mix_is_the_fp32_mix_rounded_once(dtype):
    """fp16/bf16 input and parameters: gates and mix in that dtype, and the matmul mix is the exact mix rounded
    once (within half a unit in the last place, plus fp32's accumulation error): what the module relies on
    instead of casting the expert stack to fp32. A matmul accumulating in half precision misses that bound."""
    assert mix_dtype(dtype, dtype) == dtype
    assert mix_dtype(dtype, torch.float32) == torch.float32 and mix_dtype(torch.float32, dtype) == torch.float32
    bits = 11 if dtype == torch.float16 else 8
    g = torch.Generator().manual_seed(3)
    for rows, K in ((1, 2), (8, 4), (3, 8)):
        r = torch.rand(rows, K, generator=g).to(dtype)
        w = torch.randn(K, 20_000, generator=g).to(dtype)
        exact = torch.mm(r.double(), w.double())
        fp32_sums = K * 2.0 ** -24 * torch.mm(r.double().abs(), w.double().abs())  # fp32 accumulation's own error

        def rounded_once(got):
            ulp = torch.ldexp(torch.ones_like(got), torch.frexp(got).exponent - bits).clamp_min(
                torch.finfo(dtype).tiny * torch.finfo(dtype).eps)  # subnormals: a fixed step
            return ((got - exact).abs() <= 0.5 * ulp + fp32_sums).all()

        assert rounded_once(torch.mm(r, w).double())
        assert rounded_once(torch.mm(r.float(), w.float()).to(dtype).double())
        assert not rounded_once(sum(r[:, k:k + 1] * w[k] for k in range(K)).double())  # products and sums in half


def _stored(t, dtype):
    return t.to(dtype).float()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("K,n_extra", [(1, 0), (2, 0), (2, 1), (3, 1), (4, 2)])
def test_identity_at_init_is_exact_in_half_precision(dtype, K, n_extra):
    """Built in fp16/bf16, the experts sum to 2W exactly: the mixed kernel at gate 1/2 is the stored W bit for
    bit and the module's output is the plain convolution's, bit for bit, on the one-routing path; the other paths
    within the format's rounding of the convolution itself. The inherited kernels move only where they must
    (most by one rounding step), and the sources say so."""
    conv, extras, extra_b = _teacher(seed=K)
    m = CondConv2d.from_conv(conv.weight, conv.bias, extras[:n_extra], extra_biases=extra_b[:n_extra],
                             num_experts=K, generator=torch.Generator().manual_seed(9), dtype=dtype,
                             extra_sources=[f"teacher conv {i}" for i in range(n_extra)], **conv_geometry(conv))
    assert m.weight.dtype == dtype
    w, b = conv.weight.detach().to(dtype), conv.bias.detach().to(dtype)
    half = torch.full((1, K), INIT_GATE)
    assert torch.equal((half @ m.weight.float().reshape(K, -1)).view(w.shape).to(dtype), w)
    assert torch.equal((half @ m.bias.float())[0].to(dtype), b)
    x = torch.randn(3, 16, 9, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref = F.conv2d(x, w, b, padding=1)
        assert torch.equal(m(x), ref) and torch.equal(m(x[:1]), ref[:1])
        for mode in BATCH_MODES[1:]:  # forced paths: each sample's kernel is W, the conv runs at another batch size
            m.batch_mode = mode
            with torch.enable_grad():  # the equal-rows shortcut is off under autograd
                y = m(x).detach()
            assert (y.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max(), mode
    for i in range(n_extra):  # the teacher's kernels: within one rounding step of themselves almost everywhere
        kept = (m.weight[1 + i].float() - _stored(extras[i], dtype)).abs() <= 2 * _stored(extras[i], dtype).abs() * (
            2.0 ** -8 if dtype == torch.float16 else 2.0 ** -5)
        assert kept.float().mean() >= 0.8
    if K > 1:
        assert "for an exact identity in" in " ".join(m.expert_sources[1:])


def test_files_written_before_compute_what_they_computed():
    """The stored layout is unchanged: experts as the previous init wrote them (expert 1 = 2W - T in fp32, T
    verbatim) load into a module that computes sum_k r_k W_k as before: W within fp32 rounding at init, and the
    slow definition for a trained router."""
    conv, extras, extra_b = _teacher(seed=5)
    old = {"weight": torch.stack([2 * conv.weight.detach() - extras[0], extras[0]]),
           "bias": torch.stack([2 * conv.bias.detach() - extra_b[0], extra_b[0]]),
           "routing_weight": torch.zeros(2, 16), "routing_bias": torch.zeros(2)}
    m = CondConv2d(16, 24, 3, 2, padding=1)
    m.load_state_dict(old)
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = conv(x)
        assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        _randomise(m, 11)
        assert (m(x).double() - _reference(m, x)).abs().max() <= 4e-6 * max(1.0, m(x).abs().max().item())
