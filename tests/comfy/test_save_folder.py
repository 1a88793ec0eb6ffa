"""Where Save Student UNet writes (nodes/students.py ``save_folder``), and that in this test process it writes to
the session's private folder (tests/conftest.py), never into the ComfyUI installation."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def fp(monkeypatch, tmp_path):
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(tmp_path / "models" / "unet"), str(tmp_path / "models" / "diffusion_models")],
                         folder_paths.supported_pt_extensions))
    return folder_paths


def test_comfyuis_own_diffusion_models_over_its_legacy_unet(fp):
    from distilled_unets.nodes.students import save_folder

    assert save_folder() == os.path.join(fp.models_dir, "diffusion_models")


def test_a_folder_listed_first_wins(fp, tmp_path):
    from distilled_unets.nodes.students import save_folder

    mine = str(tmp_path / "mine" / "unet")  # e.g. an extra_model_paths entry with is_default: true
    fp.add_model_folder_path("diffusion_models", mine, is_default=True)
    assert save_folder() == mine


def test_only_the_legacy_folder(fp):
    from distilled_unets.nodes.students import save_folder

    fp.folder_names_and_paths["diffusion_models"][0].pop()
    assert save_folder() == os.path.join(fp.models_dir, "unet")


def test_this_process_saves_into_the_sessions_private_folder(comfyui_path):
    """What the in-process tests write through folder_paths lands in the session's temporary folder."""
    import folder_paths
    from distilled_unets.nodes.students import save_folder

    from .. import conftest

    private = conftest._PRIVATE[0]
    for path in (save_folder(), folder_paths.get_output_directory(), folder_paths.get_temp_directory(),
                 folder_paths.get_user_directory(), folder_paths.get_input_directory(),
                 folder_paths.get_folder_paths("datasets")[0]):
        assert os.path.commonpath([path, private]) == str(private), path
        assert os.path.commonpath([path, comfyui_path]) != str(comfyui_path), path
