"""Bench setup: the pack imported as ``distilled_unets`` and ComfyUI on the path, through the same
``tools/_host.py`` the tests and tools use (benches run as plain scripts, so tools/ is put on the path here),
and the full-size random UNets the benches time, built and drawn on the device they run on
(:func:`random_unet`, :func:`random_patcher`, :func:`random_state_dict`, :func:`randomize`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import _host  # noqa: E402
from _host import REPO as ROOT  # noqa: E402, F401  (re-exported for the bench scripts)
from _host import import_pack  # noqa: E402, F401


def comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI to bench against (``explicit``, COMFYUI_PATH, the enclosing ComfyUI or ~/ComfyUI);
    exits with a message when there is none."""
    found = _host.find_comfyui(explicit)
    if found is None:
        sys.exit(_host.missing_reason(explicit))
    return found


def setup_comfy(explicit: str | os.PathLike | None = None, *, append: bool = False) -> Path:
    """Put ComfyUI on sys.path with its arguments set for a bench: CPU unless ``BENCH_DEVICE`` says
    otherwise, no other custom nodes. Exits with a message when absent."""
    try:
        return _host.setup_comfy(explicit, cpu=os.environ.get("BENCH_DEVICE", "cpu") == "cpu", append=append)
    except _host.HostError as e:
        sys.exit(str(e))


# ------------------------------------------------------------------------------------------------
# full-size random UNets, built where they run (call after setup_comfy() and import_pack())


def randomize(module, seed: int, std: float = 0.02, *, fan_in: bool = False) -> None:
    """Draw every parameter of ``module`` with a generator seeded ``seed`` on the parameters' own device: a GPU
    draws its weights itself (milliseconds), nothing comes from the CPU. N(0, std) everywhere, or with
    ``fan_in`` the scale of a trained network (matrices and kernels N(0, 1/fan-in), norm weights near 1,
    biases N(0, 0.02)), whose activations keep their size through a full-depth UNet."""
    import torch

    params = list(module.named_parameters())
    if not params or params[0][1].device.type == "meta":
        return
    g = torch.Generator(device=params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if not fan_in:
                p.normal_(0.0, std, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):  # norms
                p.normal_(1.0, 0.05, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def random_unet(topology, dtype, device, seed: int, std: float = 0.02, *, fan_in: bool = False):
    """ComfyUI's own model (``BaseModel`` / ``SDXL`` around its ``UNetModel``, through the loader's
    ``comfy_model``) of ``topology``, built directly on ``device`` in ``dtype`` (ComfyUI's ops allocate
    without initialising) and drawn there (:func:`randomize`): the full-size weights never exist on the CPU of
    a GPU run."""
    from distilled_unets.nodes.host.unet import comfy_model

    model = comfy_model(topology, dtype, None, device=device)
    randomize(model.diffusion_model, seed, std, fan_in=fan_in)
    return model.eval()


def random_patcher(topology, dtype, device, seed: int, *, fan_in: bool = True):
    """:func:`random_unet` in a plain ModelPatcher (a MODEL for sampling and the pack's nodes; weights resident,
    never ComfyUI 0.33's dynamic-VRAM streaming, so the timings are of the UNet alone)."""
    import comfy.model_management as mm
    from distilled_unets.nodes.host.patcher import new_patcher

    return new_patcher(random_unet(topology, dtype, device, seed, fan_in=fan_in), mm.get_torch_device(),
                       mm.unet_offload_device(), disable_dynamic=True)


def random_state_dict(shapes: dict, dtype, device, seed: int, std: float = 0.02, to=None) -> dict:
    """``{name: tensor}`` of ``shapes`` drawn on ``device`` from ``seed`` (N(0, std)), then moved to ``to``
    when given (a state dict as a file read into RAM would hold it: draw on the GPU, keep on the CPU)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.empty(tuple(s), dtype=dtype, device=device).normal_(0.0, std, generator=g)
        out[k] = t if to is None else t.to(to)
    return out
