"""Host test: multi-UNet routing under ComfyUI's multi-GPU CFG split, on two CPU "devices".

ComfyUI 0.33's ``MultiGPU CFG Split`` node (``comfy_extras/nodes_multigpu.py``) deep-clones the MODEL per
extra device, additional models included (``ModelPatcher.deepclone_multigpu``: a fresh load through the
patcher's ``cached_patcher_init``), and the sampler then sends the cond and the uncond batch each to
one device's clone (``samplers._calc_cond_batch_multigpu``, one thread per device). Everything here is
ComfyUI's own code; the only change is that ``get_all_torch_devices`` also lists ``cpu:1`` (tensors
placed there stay on the CPU), so a second "device" exists without a GPU. ComfyUI 0.3.64 has no
multi-GPU split: the test skips there.
"""

from __future__ import annotations

import pytest
import torch

CPU1 = torch.device("cpu", 1)


@pytest.fixture
def two_cpu_devices(monkeypatch):
    import comfy.model_management as mm

    try:
        import comfy.multigpu  # noqa: F401
        from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    except ImportError:
        pytest.skip("this ComfyUI has no multi-GPU CFG split")
    main = mm.get_torch_device()
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: [main, CPU1])
    yield MultiGPUCFGSplitNode
    mm.unload_all_models()  # the per-device clones must not outlive the test


def _loaded(tm, topology, seed):
    """A tiny UNet as a loader would return it: with the reload factory multi-GPU deep clones need."""
    from distilled_unets.nodes.host.patcher import set_reload

    def reload(disable_dynamic=False):
        p = tm.build("sd15", topology, seed=seed)
        set_reload(p, reload, ())
        return p

    return reload()


def _spy(patcher, log: list, tag: str):
    """(tag, sigma, the UNet module that ran, device thread) for every UNet forward of ``patcher``."""
    import comfy.patcher_extension as pe

    def wrapper(executor, *args, **kwargs):
        to = args[5] if len(args) > 5 else kwargs["transformer_options"]
        log.append((tag, float(to["sigmas"].reshape(-1)[0]), id(executor.class_obj),
                    to.get("multigpu_thread_device")))
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", wrapper)
    return patcher


def _sample(model, steps=6, seed=3):
    import _tiny_models as tm
    import comfy.sample

    pos, neg = tm.conditioning("sd15")
    lat = tm.latent(8)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, 5.0, "dpmpp_2m", "karras", pos, neg, lat, seed=seed,
                               disable_pbar=True)


@pytest.mark.parametrize("order", ["split_after_multi_unet", "split_before_multi_unet"])
def test_router_sends_each_step_to_its_unet_on_every_device(tm, two_cpu_devices, order):
    from distilled_unets.models.patches.multi_unet import stage_patchers
    from distilled_unets.nodes.sampling import MultiUNetModel

    split = two_cpu_devices
    calls: list = []
    small = _spy(_loaded(tm, tm.TINY_SD_TOPOLOGY, 1), calls, "early")
    full = _spy(_loaded(tm, tm.MINI_TOPOLOGY, 2), calls, "late")
    single = MultiUNetModel.execute(small, full, 0.5).result[0]
    ref = _sample(single)
    calls.clear()
    if order == "split_after_multi_unet":
        model = split.execute(single, 2).result[0]
    else:  # the late UNet split first; its clones get the early UNet when sampling starts (match_multigpu_clones)
        model = MultiUNetModel.execute(small, split.execute(full, 2).result[0], 0.5).result[0]
    (device_clone,) = model.get_additional_models_with_key("multigpu")
    assert device_clone.load_device == CPU1

    out = _sample(model)
    # the device clones the run used: the main model's and the extra device's, each with its own early UNet
    unets = {}
    for dev, p in ((None, model), (CPU1, model.get_additional_models_with_key("multigpu")[0])):
        stages = stage_patchers(p)
        unets[id(stages[0][1].model.diffusion_model)] = ("late", dev)
        unets[id(stages[1][1].model.diffusion_model)] = ("early", dev)
    switch = full.get_model_object("model_sampling").percent_to_sigma(0.5)
    devices_seen = {dev for *_, dev in calls}
    assert CPU1 in devices_seen and len(devices_seen) == 2  # both devices ran model calls
    for tag, sigma, unet, dev in calls:
        assert unets.get(unet) is not None, "a UNet outside the run's device clones ran"
        stage, unet_dev = unets[unet]
        assert stage == tag == ("early" if sigma > switch else "late"), (tag, sigma, switch)
        assert (unet_dev == CPU1) == (dev == CPU1), "a device ran another device's UNet"
    by_dev_stage = {(t, d == CPU1) for t, _s, _u, d in calls}
    assert by_dev_stage == {("early", False), ("early", True), ("late", False), ("late", True)}
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel  # the split changes the batching (cond and uncond apart) only: float rounding
