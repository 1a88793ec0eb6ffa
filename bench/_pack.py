"""Bench setup: the pack imported as ``distilled_unets`` and ComfyUI on the path, through the same
``tools/_host.py`` the tests and tools use (benches run as plain scripts, so tools/ is put on the path here),
and the full-size random UNets the benches time, built and drawn on the device they run on
(:func:`random_unet`, :func:`random_state_dict`, :func:`randomize`)."""

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


def randomize(module, seed: int, std: float = 0.02) -> None:
    """Draw every parameter of ``module`` from N(0, std) with a generator seeded ``seed`` on the
    parameters' own device: a GPU draws its weights itself (milliseconds), nothing comes from the CPU."""
    import torch

    params = list(module.parameters())
    if not params or params[0].device.type == "meta":
        return
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std, generator=g)


def random_unet(topology, dtype, device, seed: int, std: float = 0.02):
    """ComfyUI's own model (``BaseModel`` / ``SDXL`` around its ``UNetModel``, through the loader's
    ``comfy_model``) of ``topology``, built directly on ``device`` in ``dtype`` (ComfyUI's ops allocate
    without initialising) and drawn there: the full-size weights never exist on the CPU of a GPU run."""
    from distilled_unets.nodes.host.unet import comfy_model

    model = comfy_model(topology, dtype, None, device=device)
    randomize(model.diffusion_model, seed, std)
    return model.eval()


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
