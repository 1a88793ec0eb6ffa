"""Bad input is refused with a typed error naming the file and the fix, before any model is built."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distilled_unets.models.errors import IncompleteModelError, NotAUNetError, WeightFileError
from distilled_unets.models.files.weights import read_shapes, resolve_unet_source, source_shapes
from distilled_unets.models.structure.detect import detect
from safetensors.torch import save_file


def _write(path, tensors, meta=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return str(path)


@pytest.fixture
def good(tmp_path):
    return _write(tmp_path / "good.safetensors", {"a": torch.zeros(4, 4), "b": torch.ones(8)})


def test_good_file_reads(good):
    shapes, _ = read_shapes(good)
    assert shapes == {"a": (4, 4), "b": (8,)}


def test_truncated_safetensors(good, tmp_path):
    data = open(good, "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:-10])
    with pytest.raises(WeightFileError) as e:
        read_shapes(str(p))
    msg = str(e.value)
    assert "truncated" in msg and "cut.safetensors" in msg and "Fix: the download was cut off" in msg


def test_corrupt_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 32)
    with pytest.raises(WeightFileError, match="not valid JSON"):
        read_shapes(str(p))
    q = tmp_path / "tiny.safetensors"
    q.write_bytes(b"abc")
    with pytest.raises(WeightFileError, match="shorter than a safetensors header"):
        read_shapes(str(q))
    r = tmp_path / "huge.safetensors"
    r.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightFileError, match="header length is impossible"):
        read_shapes(str(r))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.ckpt"

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Boom()}, str(p))
    with pytest.raises(WeightFileError) as e:
        read_shapes(str(p))
    assert "never runs pickled code" in str(e.value) and "safetensors" in str(e.value)


def test_plain_ckpt_loads_weights_only(tmp_path):
    p = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2, 3)}}, str(p))
    assert read_shapes(str(p))[0] == {"w": (2, 3)}


@pytest.mark.parametrize("keys,what,fix", [
    ({"encoder.down.0.block.0.conv1.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
      "quant_conv.weight": (8, 8, 1, 1)}, "a VAE", "Load VAE"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
      "text_model.embeddings.token_embedding.weight": (49408, 768)}, "a text encoder", "Load CLIP"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA", "Distilled LoRA Loader"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a transformer (DiT)", "Load Diffusion Model"),
])
def test_not_a_unet(keys, what, fix):
    with pytest.raises(NotAUNetError) as e:
        detect(keys)
    assert what in str(e.value) and fix in str(e.value)


def test_tensors_that_fit_no_unet():
    with pytest.raises(NotAUNetError, match="no UNet tensors found"):
        detect({"foo.weight": (3, 3), "bar.bias": (3,)})
    # a UNet-looking file whose blocks do not form a UNet
    with pytest.raises(NotAUNetError):
        detect({"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3),
                "up_blocks.1.resnets.0.conv1.weight": (32, 64, 3, 3)})


def test_empty_folder(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(IncompleteModelError, match="folder is empty"):
        resolve_unet_source(str(d))


def test_half_downloaded_folder(tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"block_out_channels": [32]}))
    (d / "diffusion_pytorch_model.safetensors.incomplete").write_bytes(b"\0" * 10)
    with pytest.raises(IncompleteModelError) as e:
        resolve_unet_source(str(d))
    assert "unfinished download" in str(e.value)
    os.remove(d / "diffusion_pytorch_model.safetensors.incomplete")
    with pytest.raises(IncompleteModelError, match="no UNet weights"):
        resolve_unet_source(str(d))


def test_sharded_folder_with_a_missing_shard(tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    _write(d / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a": torch.zeros(2)})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    with pytest.raises(IncompleteModelError, match="1 of 2 weight shards are missing"):
        resolve_unet_source(str(d))
    _write(d / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b": torch.zeros(3)})
    src = resolve_unet_source(str(d / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    assert len(src.files) == 2
    assert source_shapes(src)[0] == {"a": (2,), "b": (3,)}


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(WeightFileError, match="does not exist"):
        resolve_unet_source(str(tmp_path / "nope.safetensors"))
    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(WeightFileError, match="empty"):
        resolve_unet_source(str(tmp_path / "zero.safetensors"))
