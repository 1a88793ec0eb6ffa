"""The loader's decisions without ComfyUI (models/files/loader.py): prediction hints, file errors that name the
file, state-dict checks, saved recipes and block maps, pipeline folders."""

from __future__ import annotations

import json

import pytest
import torch
from distilled_unets.models.errors import IncompleteModelError, NotAUNetError, WeightFileError
from distilled_unets.models.files import loader
from distilled_unets.models.structure import structures as S
from distilled_unets.models.structure.blockmap import derive
from distilled_unets.models.structure.names import module_map
from safetensors.torch import save_file

from ..layouts import diffusers_model, tiny_config


def _tiny_student_sd():
    from distilled_unets.models.structure.topology import diffusers_config

    return diffusers_model(tiny_config(diffusers_config(S.BK_TINY))).state_dict()


@pytest.fixture(scope="module")
def ldm_sd():
    from distilled_unets.models.structure.topology import diffusers_config

    from ..layouts import to_ldm

    cfg = tiny_config(diffusers_config(S.BK_TINY))
    return to_ldm(diffusers_model(cfg).state_dict(), cfg, gapped=False)


def _save(path, sd, meta=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("meta,extra,want,where", [
    ({}, {}, None, ""),
    ({"modelspec.prediction_type": "v_prediction"}, {}, "v_prediction", "modelspec.prediction_type"),
    ({"modelspec.predict_key": "v"}, {}, "v_prediction", "modelspec.predict_key"),   # ComfyUI ModelSave
    ({"modelspec.predict_key": "epsilon"}, {}, "eps", "modelspec.predict_key"),
    ({}, {"v_pred": torch.tensor([])}, "v_prediction", "v_pred marker"),           # ModelSave's marker tensor
    ({loader.META_PREDICTION: "v_prediction"}, {}, "v_prediction", loader.META_PREDICTION),
])
def test_prediction_hint_from_file(tmp_path, ldm_sd, meta, extra, want, where):
    sd = {"model.diffusion_model." + k: v for k, v in ldm_sd.items()}
    sd.update(extra)
    f = loader.read_unet(_save(tmp_path / "student.safetensors", sd, meta or None))
    pred, zsnr, why = loader.prediction_hint(f)
    assert pred == want and where in why and not zsnr
    assert f.detection.layout == "ldm" and f.topology.signature() == S.BK_TINY.with_width(32).signature()


def test_ztsnr_marker_and_file_name(tmp_path, ldm_sd):
    sd = {"model.diffusion_model." + k: v for k, v in ldm_sd.items()}
    f = loader.read_unet(_save(tmp_path / "anime-vpred.safetensors", dict(sd, v_pred=torch.tensor([]),
                                                                          ztsnr=torch.tensor([]))))
    assert loader.prediction_hint(f)[:2] == ("v_prediction", True)
    f = loader.read_unet(_save(tmp_path / "x-768-v.safetensors", sd))
    assert loader.prediction_hint(f)[::2] == ("v_prediction", "file name")


def test_scheduler_config_of_a_pipeline(tmp_path):
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    _save(unet / "diffusion_pytorch_model.safetensors", _tiny_student_sd())
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    f = loader.read_unet(str(unet))
    assert loader.prediction_hint(f) == ("v_prediction", True, "scheduler_config.json")
    assert f.params == sum(v.numel() for v in _tiny_student_sd().values())


@pytest.mark.parametrize("tensors,what", [
    ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, "a VAE"),
    ({"foo": torch.zeros(3)}, "no UNet tensors"),
])
def test_every_detection_error_names_the_file(tmp_path, tensors, what):
    path = _save(tmp_path / "twenty-files-in-here.safetensors", tensors)
    with pytest.raises(NotAUNetError) as e:
        loader.read_unet(path)
    assert what in str(e.value) and f"(file: {path})" in str(e.value)


def test_a_third_of_a_unet_names_the_file(tmp_path, ldm_sd):
    part = dict(list(ldm_sd.items())[: len(ldm_sd) // 3])
    path = _save(tmp_path / "part.safetensors", part)
    with pytest.raises((NotAUNetError, IncompleteModelError)) as e:
        loader.read_unet(path)
    assert f"(file: {path})" in str(e.value)


def test_check_state_dict():
    want = {"a": (2, 2), "b": (3,)}
    loader.check_state_dict(want, dict(want))
    with pytest.raises(IncompleteModelError, match="1 UNet tensors are missing") as e:
        loader.check_state_dict(want, {"a": (2, 2)}, "/m/x.safetensors")
    assert "(file: /m/x.safetensors)" in str(e.value)
    with pytest.raises(NotAUNetError, match="0 unexpected and 1 wrongly shaped"):
        loader.check_state_dict(want, {"a": (2, 3), "b": (3,)})


def test_recipe_and_block_map_read_back():
    bm = derive(S.SDXL, S.KOALA_700M, built=True, layer_choice=S.spread_layers)
    meta = {loader.META_RECIPE: json.dumps({"preset": "koala-700m", "teacher": "myXL", "teacher_sha256": "ab" * 32}),
            loader.META_BLOCK_MAP: bm.to_json()}
    assert loader.recipe_of(meta)["preset"] == "koala-700m"
    back = loader.block_map_of(meta, S.KOALA_700M)
    assert back is not None and back.units == bm.units
    assert loader.block_map_of(meta, S.KOALA_1B) is None  # another structure: ignored
    assert loader.recipe_of({loader.META_RECIPE: "{broken"}) is None
    text = "\n".join(loader.recipe_lines(loader.recipe_of(meta), back))
    assert "preset koala-700m" in text and "myXL" in text and "0 new" in text


def test_pipeline_parts(tmp_path):
    pipe = tmp_path / "p"
    (pipe / "unet").mkdir(parents=True)
    with pytest.raises(IncompleteModelError, match="text_encoder/, vae/") as e:
        loader.resolve_pipeline(str(pipe))
    assert f"(file: {pipe})" in str(e.value)
    (pipe / "text_encoder").mkdir()
    (pipe / "vae").mkdir()
    with pytest.raises(IncompleteModelError, match="no weights file"):
        loader.resolve_pipeline(str(pipe))
    _save(pipe / "text_encoder" / "model.safetensors", {"w": torch.zeros(4)})
    vae = _save(pipe / "vae" / "diffusion_pytorch_model.safetensors", {"w": torch.zeros(64)})
    parts = loader.resolve_pipeline(str(pipe))
    assert parts.unet == str(pipe / "unet") and parts.vae == vae and len(parts.text_encoders) == 1
    data = open(vae, "rb").read()
    open(vae, "wb").write(data[:-16])
    with pytest.raises(WeightFileError, match="truncated") as e:
        loader.resolve_pipeline(str(pipe))
    assert vae in str(e.value)


def test_module_map_is_the_loaders_rename():
    """The loader renames a diffusers file with the same map the LoRA mapper reads (one name map)."""
    from distilled_unets.models.structure.detect import detect

    det = detect({k: tuple(v.shape) for k, v in _tiny_student_sd().items()})
    mp = module_map(det.topology)
    assert len(det.key_map) == 2 * len(mp) - sum(1 for m in mp if m.endswith(("to_q", "to_k", "to_v")))
    for k, v in det.key_map.items():
        mod, _, param = k.rpartition(".")
        assert v == f"{mp[mod]}.{param}"
