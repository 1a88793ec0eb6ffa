"""Fixtures shared by the host tests (a real ComfyUI on sys.path, set up by tests/conftest.py)."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="module")
def tm():
    """The tiny-UNet builders (tests/comfy/_tiny_models.py); torchsde's step-size warning silenced."""
    import _tiny_models

    warnings.filterwarnings("ignore", message="Should have tb<=t1")
    return _tiny_models


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A private models/diffusion_models + models/diffusers registered in folder_paths."""
    import folder_paths

    unet_dir = tmp_path / "diffusion_models"
    pipe_dir = tmp_path / "diffusers"
    unet_dir.mkdir()
    pipe_dir.mkdir()
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("diffusion_models", "diffusers")}
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(unet_dir)], saved["diffusion_models"][1])
    folder_paths.folder_names_and_paths["diffusers"] = ([str(pipe_dir)], saved["diffusers"][1])
    folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()
