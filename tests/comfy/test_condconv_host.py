"""Host tests (real ComfyUI, CPU, tiny random UNets): CondConv inside ComfyUI's UNetModel (nodes/host/condconv.py).

Identity-initialised CondConv leaves the UNet's output unchanged (bit for bit with fp16/bf16 storage);
fp16/bf16 storage computes in fp32 under manual cast; ComfyUI's lowvram load manages the module like its own
Conv2d (comfy_cast_weights, weight patches as LowVramPatch) and gives the fully loaded output; ComfyUI's own
loader refuses a CondConv file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def tm():
    import _tiny_models

    torch.set_num_threads(1)
    return _tiny_models


@pytest.fixture(scope="module")
def cc():
    from distilled_unets.nodes.host import condconv

    return condconv


def _build(tm, dtype=torch.float32, manual_cast=None, seed=0, model_channels=32, topology=None):
    """A tiny tiny-sd-structured SD1.5 UNet (BaseModel) with the given storage / compute dtypes."""
    from distilled_unets.nodes.host.unet import comfy_model

    model = comfy_model(tm.tiny(topology or tm.TINY_SD_TOPOLOGY, "sd15", model_channels=model_channels), dtype,
                        manual_cast)
    tm.init_weights(model.diffusion_model, seed)
    model.eval()
    return model


def _inputs(batch=2, size=16, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g) * torch.arange(1.0, batch + 1).view(batch, 1, 1, 1)
    t = torch.tensor([999.0, 400.0][:batch] + [10.0] * max(0, batch - 2))
    ctx = torch.randn(batch, 8, 768, generator=g)
    return x.to(dtype), t, ctx.to(dtype)


def _run(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, timesteps=t, context=ctx)


def _identity_condconvs(cc, unet, paths, num_experts=3, seed=0):
    """From each conv's own kernel, with the other swapped convs' kernels of the same shape as extra
    experts (the "cross-layer" part) and random experts up to num_experts."""
    from distilled_unets.models.patches.condconv import CondConv2d, conv_geometry

    g = torch.Generator().manual_seed(seed)
    convs = {p: unet.get_submodule(p) for p in paths}
    out = {}
    for p, conv in convs.items():
        extras = [c for q, c in convs.items() if q != p and c.weight.shape == conv.weight.shape][: num_experts - 2]
        out[p] = CondConv2d.from_conv(conv.weight.float(), conv.bias.float(), [c.weight.float() for c in extras],
                                      extra_biases=[c.bias.float() for c in extras], num_experts=num_experts,
                                      generator=g, dtype=conv.weight.dtype, **conv_geometry(conv))
    return out


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_stage_conv_paths_are_the_level0_3x3_convs(tm, cc):
    unet = _build(tm).diffusion_model
    paths = cc.stage_conv_paths(unet, 0)
    # tiny-sd: one resnet + the downsampler at level 0 going down, two resnets coming up
    assert paths == ["input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "input_blocks.2.0.op",
                     "output_blocks.4.0.in_layers.2", "output_blocks.4.0.out_layers.3",
                     "output_blocks.5.0.in_layers.2", "output_blocks.5.0.out_layers.3"]
    for p in paths:
        m = unet.get_submodule(p)
        assert isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    assert cc.stage_conv_paths(unet, 0, include_resample=False, up=False) == paths[:2]
    assert cc.stage_conv_paths(unet, 2, down=False) == [
        "output_blocks.0.0.in_layers.2", "output_blocks.0.0.out_layers.3",
        "output_blocks.1.0.in_layers.2", "output_blocks.1.0.out_layers.3", "output_blocks.1.2.conv"]


def test_identity_swap_leaves_the_unet_output_unchanged(tm, cc):
    unet = _build(tm).diffusion_model
    inputs = _inputs()
    before = _run(unet, inputs)
    paths = cc.stage_conv_paths(unet, 0)
    replaced = cc.swap_condconv(unet, _identity_condconvs(cc, unet, paths))
    assert set(replaced) == set(paths)
    for p in paths:
        m = unet.get_submodule(p)
        assert isinstance(m, cc.ComfyCondConv2d) and m.num_experts == 3
        assert m.weight.shape[1:] == replaced[p].weight.shape and not m.comfy_cast_weights
    assert any("extra" not in s and "random" not in s for s in unet.get_submodule(paths[0]).expert_sources)
    after = _run(unet, inputs)
    assert _rel(after, before) <= 1e-5
    # the swap is reversible: swapping the returned convs back gives the original UNet, bit for bit
    cc.swap_condconv(unet, replaced)
    assert all(unet.get_submodule(p) is replaced[p] for p in paths)
    assert torch.equal(_run(unet, inputs), before)


def test_swap_rejects_what_does_not_fit(tm, cc):
    from distilled_unets.models.patches.condconv import CondConv2d

    unet = _build(tm).diffusion_model
    with pytest.raises(ValueError, match="stride"):
        cc.swap_condconv(unet, {"input_blocks.2.0.op": CondConv2d(32, 32, 3, 2, padding=1)})
    with pytest.raises(ValueError, match="not a Conv2d"):
        cc.swap_condconv(unet, {"input_blocks.1.0.in_layers": 2})
    with pytest.raises(KeyError):
        cc.swap_condconv(unet, {"input_blocks.1.0.nothing.2": 2})


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_half_storage_computes_in_fp32(tm, cc, storage):
    model = _build(tm, dtype=storage, manual_cast=torch.float32)
    unet = model.diffusion_model
    conv = unet.get_submodule("input_blocks.1.0.in_layers.2")
    assert conv.weight.dtype == storage and conv.comfy_cast_weights  # ComfyUI's manual-cast ops
    inputs = _inputs()
    before = _run(unet, inputs)
    paths = cc.stage_conv_paths(unet, 0)
    cc.swap_condconv(unet, _identity_condconvs(cc, unet, paths))
    m = unet.get_submodule(paths[0])
    assert m.weight.dtype == storage and m.routing_weight.dtype == storage and m.comfy_cast_weights
    # the module alone: fp32 compute from the stored half-precision parameters
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 16, 16, generator=g)
    with torch.no_grad():
        m.routing_weight.copy_(torch.randn(m.routing_weight.shape, generator=g))  # per-sample routing
        y = m(x)
        ref = m.conv_forward(x, m.weight.float(), m.bias.float(), m.routing_weight.float(), m.routing_bias.float())
        m.routing_weight.zero_()
    assert y.dtype == torch.float32
    assert _rel(y, ref) <= 1e-6
    # the whole UNet: unchanged, bit for bit (the experts, built in the storage dtype, sum to 2W exactly)
    after = _run(unet, inputs)
    assert after.dtype == torch.float32
    assert torch.equal(after, before)


def _lowvram_modules(unet):
    return [m for m in unet.modules() if getattr(m, "comfy_cast_weights", False)]


def test_lowvram_load_on_cpu_matches_full_load(tm, cc):
    import comfy.model_management as mm
    import comfy.model_patcher

    model = _build(tm)
    unet = model.diffusion_model
    paths = cc.stage_conv_paths(unet, 0)
    cc.swap_condconv(unet, _identity_condconvs(cc, unet, paths))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # a trained-looking router: samples routed differently
        for p in paths:
            unet.get_submodule(p).routing_weight.copy_(torch.randn(3, unet.get_submodule(p).in_channels, generator=g))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    target = "diffusion_model." + paths[0]
    w = unet.get_submodule(paths[0]).weight
    assert patcher.add_patches({target + ".weight": (0.1 * torch.randn(w.shape, generator=g),)}) == [target + ".weight"]
    inputs = _inputs()
    plain = _run(unet, inputs)
    dev = torch.device("cpu")

    patcher.patch_model(dev, lowvram_model_memory=0)  # full load: the patch is written into the weight
    assert not model.model_lowvram
    assert not any(isinstance(m, cc.ComfyCondConv2d) for m in _lowvram_modules(unet))
    full = _run(unet, inputs)
    patcher.unpatch_model(dev)
    assert torch.equal(_run(unet, inputs), plain)

    patcher.patch_model(dev, lowvram_model_memory=1)  # every op offloaded: ComfyUI casts per call
    try:
        assert model.model_lowvram
        ours = [unet.get_submodule(p) for p in paths]
        assert all(m.comfy_cast_weights and m.prev_comfy_cast_weights is False for m in ours)
        assert [type(f).__name__ for f in ours[0].weight_function] == ["LowVramPatch"]
        assert all(not m.weight_function for m in ours[1:])
        low = _run(unet, inputs)
    finally:
        patcher.unpatch_model(dev)
    assert all(not m.comfy_cast_weights and not hasattr(m, "prev_comfy_cast_weights")
               for m in (unet.get_submodule(p) for p in paths))
    assert not torch.equal(full, plain)  # the patch and the routing do something
    assert _rel(low, full) <= 1e-6
    assert torch.equal(_run(unet, inputs), plain)


def _sd15_detectable(tm, dtype=torch.float16):
    """The smallest UNet ComfyUI's own loader detects as SD1.5 (320 channels, context 768): one level."""
    from distilled_unets.models.structure.topology import Topology

    topology = Topology("sd1", 320, (1,), (1,), (1,), (1, 1), -2, 768, False)
    return _build(tm, dtype=dtype, model_channels=320, topology=topology)


def test_comfyui_own_loader_refuses_a_condconv_file(tm, cc):
    import comfy.sd

    model = _sd15_detectable(tm)
    unet = model.diffusion_model
    plain_sd = {k: torch.zeros_like(v) for k, v in unet.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(plain_sd))  # the control: loads as a plain UNet
    assert patcher is not None and patcher.model.diffusion_model.input_blocks[1][0].in_layers[2].weight.ndim == 4
    del patcher

    paths = cc.stage_conv_paths(unet, 0)
    cc.swap_condconv(unet, dict.fromkeys(paths, 2))
    sd = {k: torch.zeros_like(v) for k, v in unet.state_dict().items()}
    assert cc.condconv_paths(sd) == dict.fromkeys(paths, 2)
    with pytest.raises(RuntimeError, match=r"size mismatch for input_blocks\.1\.0\.in_layers\.2\.weight"):
        comfy.sd.load_diffusion_model_state_dict(sd)


def test_condconv_state_dict_round_trip_through_swap(tm, cc):
    """What a loader does: build the plain UNet, swap in empty CondConvs where the file has them, load strict."""
    src = _build(tm, seed=1).diffusion_model
    cc.swap_condconv(src, _identity_condconvs(cc, src, cc.stage_conv_paths(src, 0), num_experts=2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, cc.ComfyCondConv2d):
                m.routing_weight.copy_(torch.randn(m.routing_weight.shape, generator=g))
    sd = {"model.diffusion_model." + k: v.clone() for k, v in src.state_dict().items()}

    dst = _build(tm, seed=2).diffusion_model
    found = cc.condconv_paths(sd, prefix="model.diffusion_model.")
    assert found == dict.fromkeys(cc.stage_conv_paths(dst, 0), 2)
    cc.swap_condconv(dst, found)
    dst.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()}, strict=True)
    inputs = _inputs()
    assert torch.equal(_run(dst, inputs), _run(src, inputs))
