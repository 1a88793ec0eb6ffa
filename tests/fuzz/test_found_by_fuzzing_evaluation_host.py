"""One regression test per failure the fuzz suite found in the evaluation's readers behind ComfyUI (CLIP vision
and VAE files, as tools/evaluate.py and tools/distill.py read them, and Evaluate Student's files under
models/inception); each failed as its docstring says before the fix.

Full-size files are written sparse (a safetensors header, then a hole up to the size it declares): the loaders
read the header first, and refuse these before reading any tensor, so nothing of their size is written or read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distilled_unets.models.students.evaluate import EvaluationError
from safetensors.torch import save_file

from . import _mutate as M
from . import _node_readers as NR
from ._harness import limits, memory_cause

pytestmark = pytest.mark.host


def _refused(fn, match: str) -> EvaluationError:
    with limits(), pytest.raises(EvaluationError, match=match) as e:
        fn()
    assert memory_cause(e.value) is None, e.value
    return e.value


def _vitl_shapes() -> dict:
    """{name: shape} of the ViT-L/14 tower ComfyUI builds (its own config and class, on the meta device)."""
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops

    with open(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_tiny_tensors_named_as_vit_bigg_are_refused_before_comfyui_builds_the_tower(tmp_path):
    """Was: ComfyUI built ViT-bigG/14 at full size from the one key name (gigabytes in float32: an allocation
    failure under the harness's cap, reported as 'cannot be read as a CLIP vision model')."""
    from distilled_unets.nodes.host import judging as J

    sd = NR.tiny_clip_vision(tmp_path)
    sd["vision_model.encoder.layers.47.layer_norm1.weight"] = torch.ones(64)
    save_file(sd, str(tmp_path / "claims-bigG.safetensors"))
    e = _refused(lambda: J.load_clip_vision(str(tmp_path / "claims-bigG.safetensors")),
                 "tensor.s. of the ViT-bigG/14 tower ComfyUI builds from this file are missing")
    assert e.input_name == "--clip-vision" and "claims-bigG.safetensors" in str(e)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("vision_model.encoder.layers.23.mlp.fc2.weight"), "1 tensor.s. of the ViT-L/14 tower"),
    (lambda sd: [sd.pop(k) for k in list(sd) if ".layers.23." in k], "ViT-bigG/14: 24, 32 or 48 layers; its tensors "
                                                                     "hold 23"),
    (lambda sd: sd.update({"visual_projection.weight": (512, 1024)}), r"has shape \[512, 1024\]"),
], ids=["a tensor missing", "the last layer missing", "another projection"])
def test_a_vit_l_file_missing_tensors_is_refused_from_its_header(tmp_path, edit, match):
    """Was: ComfyUI logged 'missing clip vision' and returned the tower with those weights uninitialised (a load
    that 'worked', its embeddings garbage); a projection of another shape was a RuntimeError after the 1.2 GB build."""
    from distilled_unets.nodes.host import judging as J

    shapes = _vitl_shapes()
    edit(shapes)
    p = M.sparse_safetensors(tmp_path / "clip-vit-large.safetensors", shapes)
    _refused(lambda: J.load_clip_vision(str(p)), match)


def test_a_whole_vit_l_file_passes_the_check(tmp_path):
    """The check refuses none of a whole tower's tensors, and reads nothing but the header (the fuzz suite loads
    one, full size, unmutated)."""
    from distilled_unets.nodes.host import judging as J

    p = M.sparse_safetensors(tmp_path / "clip-vit-large.safetensors", _vitl_shapes())
    with limits():
        assert J.check_clip_vision(str(p)) == "ViT-L/14"


def _sd_vae_shapes(latent_channels: int = 4) -> dict:
    """{name: shape} of the SD 1.x / 2.x / SDXL VAE ComfyUI builds (its AutoencoderKL, on the meta device); of
    another latent width, the VAE ComfyUI builds from such a file (SD3's and Flux's have 16)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cfg = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
           "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=cfg, embed_dim=latent_channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("decoder.up.0.block.1.conv2.weight"), r"1 tensor.s. of the SD 1.x / 2.x / SDXL VAE are missing"),
    (lambda sd: sd.update({"decoder.conv_in.weight": (65536, 4, 3, 3)}),
     r"decoder.conv_in.weight has shape \[65536, 4, 3, 3\]"),
    (lambda sd: sd.update(_sd_vae_shapes(16)), r"a VAE of 16 latent channels \(decoder.conv_in.weight has shape "
                                               r"\[512, 16, 3, 3\]\); the teacher's latents have 4"),
], ids=["a decoder tensor missing", "a decoder sized from conv_in", "16 latent channels"])
def test_a_vae_that_cannot_decode_the_teachers_latents_is_refused_from_its_header(tmp_path, edit, match):
    """Was: a missing decoder tensor left uninitialised by ComfyUI ('Missing VAE keys' logged, the load returned);
    a conv_in of 65,536 channels made ComfyUI 0.33 build a decoder 128 times as wide (154 GB asked: an allocation
    failure under the harness's cap, reported as 'cannot build a VAE'; 0.3.64 built the SD VAE, then failed to
    load it); a 16-channel VAE (SD3, Flux) was built and returned, to fail at the first held-out evaluation."""
    from distilled_unets.nodes.host import judging as J

    shapes = _sd_vae_shapes()
    edit(shapes)
    p = M.sparse_safetensors(tmp_path / "vae.safetensors", shapes)
    e = _refused(lambda: J.load_vae(str(p)), match)
    assert e.input_name == "--vae" and "vae.safetensors" in str(e)


def test_a_taesd_missing_a_decoder_block_is_refused(tmp_path):
    """Was: ComfyUI left the block's weights uninitialised and the VAE decoded garbage."""
    import demo_weights
    from distilled_unets.nodes.host import judging as J

    sd = {k: v for k, v in demo_weights.taesd("", seed=4).items() if not k.startswith("taesd_decoder.9.")}
    save_file(sd, str(tmp_path / "taesd.safetensors"))
    _refused(lambda: J.load_vae(str(tmp_path / "taesd.safetensors")), "tensor.s. of a TAESD of 4 latent channels")


def test_a_checkpoints_vae_is_read_without_its_unet(tmp_path, monkeypatch):
    """Only the VAE's tensors of a full checkpoint are read (was: every tensor of the checkpoint, the UNet's and
    the text encoder's included)."""
    import demo_weights
    from distilled_unets.models.files import weights
    from distilled_unets.nodes.host import judging as J

    ck = {f"first_stage_model.{k}": v for k, v in demo_weights.taesd("", seed=4).items()}
    ck["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    save_file(ck, str(tmp_path / "checkpoint.safetensors"))
    read = []
    real = weights.read_tensors
    monkeypatch.setattr(weights, "read_tensors", lambda path, names: read.extend(names) or real(path, names))
    vae = J.load_vae(str(tmp_path / "checkpoint.safetensors"))
    assert read and all(k.startswith("first_stage_model.") for k in read)
    NR.vae_works(vae)
