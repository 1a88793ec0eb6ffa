"""One regression test per raw exception the fuzz suite found in the host-free readers (each raised the exception
named in its docstring before the fix); the node-level ones are in test_found_by_fuzzing_host.py."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from distilled_unets.models.errors import IncompleteModelError, LoraError, NotAUNetError, WeightFileError
from distilled_unets.models.files.loader import META_BLOCK_MAP, block_map_of, prediction_hint, read_unet
from distilled_unets.models.files.weights import inspect_safetensors, read_shapes, resolve_unet_source
from distilled_unets.models.patches import lora_keys as lk
from distilled_unets.models.structure import names
from distilled_unets.models.structure.blockmap import BlockMap, derive
from distilled_unets.models.structure.detect import detect
from distilled_unets.models.students.distill import datasets as DS
from distilled_unets.models.students.distill.vgg import load_vgg16
from safetensors.torch import save_file

from ..layouts import write_training_dataset
from . import _mutate as M
from ._harness import limits
from ._readers import MINI, STUDENT, TEACHER, condconv_state, save, student_metadata, unet_layouts


def _student_file(tmp_path, **meta):
    _, files = unet_layouts(STUDENT)
    return save({f"model.diffusion_model.{k}": v for k, v in files["ldm"].items()}, tmp_path / "student.safetensors",
                dict(student_metadata(), **meta))


def _edit_header(path, edit):
    header, body = M.split_safetensors(path.read_bytes())
    edit(header)
    path.write_bytes(M.join_safetensors(header, body))
    return path


# ------------------------------------------------------------------------------------------------
# a saved student's metadata


@pytest.mark.parametrize("value", ["[1, 2]", "null", "7", '"text"', '{"format": 1, "units": []}'])
def test_a_block_map_of_the_wrong_json_type_is_ignored(tmp_path, value, caplog):
    """Was AttributeError: 'list' object has no attribute 'get' (models/structure/blockmap.py): issue 26."""
    f = read_unet(str(_student_file(tmp_path, **{META_BLOCK_MAP: value})))
    with caplog.at_level(logging.WARNING, logger="distilled_unets"):
        assert block_map_of(f.metadata, f.topology) is None
    assert "ignoring the file's block map" in caplog.text
    with pytest.raises(ValueError, match="not a block map|format"):
        BlockMap.from_json(value)


def test_a_block_map_of_an_impossible_structure_is_refused_at_once():
    """A student config with 10**9 res blocks per level made the reader walk 10**9 units (a hang)."""
    d = json.loads(derive(TEACHER, STUDENT, built=True).to_json())
    d["student"]["num_res_blocks"] = [10 ** 9, 10 ** 9]
    with limits(60), pytest.raises(ValueError, match="student structure: num_res_blocks"):  # a hang guard only
        BlockMap.from_json(json.dumps(d))


def test_a_block_map_naming_layers_its_source_lacks_is_refused():
    """Layers beyond the teacher unit's depth (an IndexError in the LoRA mapping later)."""
    d = json.loads(derive(TEACHER, STUDENT, built=True).to_json())
    unit = next(k for k, s in d["units"].items() if s["layers"])
    d["units"][unit]["layers"] = [7]
    with pytest.raises(ValueError, match="transformer layers its source does not have"):
        BlockMap.from_json(json.dumps(d))


def test_a_block_map_round_trips_with_its_checks():
    bm = derive(TEACHER, STUDENT, built=True)
    back = BlockMap.from_json(bm.to_json(), STUDENT)
    assert back.units == bm.units and back.student == bm.student
    with pytest.raises(ValueError, match="another structure"):
        BlockMap.from_json(bm.to_json(), MINI)


# ------------------------------------------------------------------------------------------------
# safetensors headers


@pytest.mark.parametrize("shape,why", [([{"n": 4}], "shape"), (["4"], "shape"), ([True], "shape"), ([-1], "shape"),
                                       ("4", "shape"), (None, "shape")])
def test_a_shape_of_the_wrong_type_is_a_typed_error(tmp_path, shape, why):
    """Was TypeError: unhashable type / unsupported operand (math.prod over the shape)."""
    p = save({"a": torch.zeros(4), "b": torch.zeros(2)}, tmp_path / "x.safetensors")
    _edit_header(p, lambda h: h["a"].update(shape=shape))
    with pytest.raises(WeightFileError, match=f"malformed header entry \\({why}"):
        inspect_safetensors(str(p))


def test_metadata_that_is_not_a_table_of_strings_is_a_typed_error(tmp_path):
    """Was ValueError: dictionary update sequence element (source_shapes merging a list)."""
    p = save({"a": torch.zeros(4)}, tmp_path / "x.safetensors")
    for meta in ([["k", "v"]], {"k": 5}, "text"):
        _edit_header(p, lambda h, meta=meta: h.update(__metadata__=meta))
        with pytest.raises(WeightFileError, match="metadata is not a table of strings"):
            read_shapes(str(p))


def test_overlapping_tensors_and_unknown_dtypes_are_refused(tmp_path):
    """A second name for the same bytes, and a dtype the size check skipped, passed the header check."""
    p = save({"a": torch.zeros(4), "b": torch.zeros(2)}, tmp_path / "x.safetensors")
    _edit_header(p, lambda h: h.update(c=dict(h["a"])))
    with pytest.raises(WeightFileError, match="where another tensor ends"):
        inspect_safetensors(str(p))
    q = save({"a": torch.zeros(4)}, tmp_path / "y.safetensors")
    _edit_header(q, lambda h: h["a"].update(dtype="F128"))
    with pytest.raises(WeightFileError, match="dtype 'F128' is none this loader reads"):
        inspect_safetensors(str(q))


def test_a_header_claiming_terabytes_is_refused_before_anything_is_read(tmp_path):
    p = save({"a": torch.zeros(4)}, tmp_path / "x.safetensors")
    _edit_header(p, lambda h: h["a"].update(shape=[2 ** 40, 2 ** 40], data_offsets=[0, 2 ** 82]))
    with pytest.raises(WeightFileError, match="truncated"):
        read_shapes(str(p))


# ------------------------------------------------------------------------------------------------
# diffusers folders


def _folder(tmp_path):
    cfg, files = unet_layouts(MINI)
    d = tmp_path / "unet"
    save(files["diffusers"], d / "diffusion_pytorch_model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    return d, cfg


def test_a_config_json_that_is_not_utf8_or_not_an_object_is_a_typed_error(tmp_path):
    """Was UnicodeDecodeError (weights._folder_source), and TypeError on a config of another JSON type."""
    d, _ = _folder(tmp_path)
    (d / "config.json").write_bytes(b'{"block_out_channels": [32, 64], "x": "\xc4"}')
    with pytest.raises(IncompleteModelError, match="unreadable or cut off"):
        resolve_unet_source(str(d))
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(IncompleteModelError, match="not a model config"):
        resolve_unet_source(str(d))


def test_a_config_json_with_absurd_sizes_does_not_stop_the_load(tmp_path):
    """layers_per_block 10**9 made the config's structure a loop of 10**9 blocks; wrong types raised."""
    d, cfg = _folder(tmp_path)
    for bad in ({"layers_per_block": 10 ** 9}, {"block_out_channels": [0, "64"]}, {"down_block_types": 5}):
        (d / "config.json").write_text(json.dumps(dict(cfg, **bad)))
        with limits(60):  # address space capped: the list of 10**9 blocks fails here instead of filling memory
            assert read_unet(str(d)).topology == MINI


def test_a_weight_index_of_the_wrong_structure_is_a_typed_error(tmp_path):
    """Was TypeError: unhashable type: 'list' (shard names read from the index)."""
    d, _ = _folder(tmp_path)
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ["x"]}}))
    with pytest.raises(IncompleteModelError, match="not a weight index"):
        resolve_unet_source(str(d))


def test_a_scheduler_config_of_the_wrong_type_is_ignored(tmp_path):
    """Was AttributeError: 'list' object has no attribute 'get' (prediction_hint)."""
    d, _ = _folder(tmp_path)
    (tmp_path / "scheduler").mkdir()
    for doc in ("[1]", '{"prediction_type": 5}', "\xc4"):
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(doc, encoding="latin-1")
        assert prediction_hint(read_unet(str(d)))[0] is None


# ------------------------------------------------------------------------------------------------
# pickles, detection, CondConv


def _damaged_pickle(tmp_path, value, name):
    buf = io.BytesIO()
    torch.save(value, buf, _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    data[0] ^= 1  # the first pickle opcode of the magic number: torch's unpickler pops an empty stack
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def test_a_damaged_weights_only_pickle_is_a_typed_error(tmp_path):
    """Was IndexError: pop from empty list (torch's weights-only unpickler), for a .ckpt and a dataset shard."""
    p = _damaged_pickle(tmp_path, {"state_dict": {"a": torch.zeros(2)}}, "unet.ckpt")
    with pytest.raises(WeightFileError, match="cannot be read as torch weights"):
        read_shapes(str(p))
    s = _damaged_pickle(tmp_path, {"latents": [], "conditioning": []}, "shard_0000.pkl")
    with pytest.raises(DS.DatasetError, match="cannot be read"):
        DS.load_shard(str(s))


def test_a_missing_tensor_the_detection_needs_is_named():
    """Was KeyError: 'input_blocks.3.0.out_layers.3.weight' (detect.from_ldm)."""
    _, files = unet_layouts(MINI)
    shapes = {k: tuple(v.shape) for k, v in files["ldm"].items() if not k.startswith("input_blocks.3.0.out_layers.3")}
    with pytest.raises(NotAUNetError, match="'input_blocks.3.0.out_layers.3.weight' that the detected structure"):
        detect(shapes)
    shapes = {k: tuple(v.shape) for k, v in files["ldm"].items()}
    shapes["input_blocks.0.0.weight"] = (32,)
    with pytest.raises(NotAUNetError, match="shapes no UNet layer has"):
        detect(shapes)


def test_condconv_experts_outside_the_unet_are_a_typed_error(tmp_path):
    """Was KeyError on the CondConv path (loader.read_unet)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in condconv_state(MINI).items()}
    sd["first_stage_model.conv.weight"] = torch.zeros(2, 4, 4, 3, 3, dtype=torch.float16)
    sd["first_stage_model.conv.routing_weight"] = torch.zeros(2, 4, dtype=torch.float16)
    with pytest.raises(NotAUNetError, match="no convolution of the UNet"):
        read_unet(str(save(sd, tmp_path / "cc.safetensors")))


# ------------------------------------------------------------------------------------------------
# Save Training Dataset folders


def _dataset(folder, cond_of=None, n=4):
    g = torch.Generator().manual_seed(0)
    lat = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(n)]
    cond = [[[torch.randn(1, 6, 16, generator=g), {}]] for _ in range(n)]
    if cond_of:
        cond[-1] = cond_of(cond[-1])
    write_training_dataset(folder, lat, cond, shard_size=2)
    return folder


def _prepare(latent, cond):
    return latent[0], cond[0][0][0], None


@pytest.mark.parametrize("num_samples", [{}, 1e400, [4]])
def test_metadata_num_samples_of_the_wrong_type_is_ignored(tmp_path, num_samples):
    """Was TypeError / OverflowError: int() of the declared sample count."""
    d = _dataset(tmp_path / "d")
    (d / "metadata.json").write_text(json.dumps({"num_samples": num_samples}).replace("Infinity", "1e400"))
    assert len(DS.ShardedDataset(str(d), _prepare)) == 4


@pytest.mark.parametrize("edit,match", [
    (lambda c: [c[0], c[0]], "not one CLIP Text Encode output"),
    (lambda c: [[c[0][0][..., :5], {}]], "conditioning width 5"),
    (lambda c: [[c[0][0].long(), {}]], "not one CLIP Text Encode output"),
])
def test_a_later_sample_that_cannot_be_trained_on_is_refused_when_the_dataset_opens(tmp_path, edit, match):
    """Was a DistillError (or RuntimeError in torch.stack) in the middle of training, naming no shard."""
    d = _dataset(tmp_path / "d", edit)
    with pytest.raises(DS.DatasetError, match=match) as e:
        DS.ShardedDataset(str(d), _prepare)
    assert "shard_0001.pkl" in str(e.value)


# ------------------------------------------------------------------------------------------------
# LoRA plans (host-free; the node with ComfyUI is in test_found_by_fuzzing_host.py)


def _lora(**extra):
    shapes = {f"diffusion_model.{v}.weight": (8, 8) for v in names.module_map(STUDENT).values()}
    t = {"lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2), "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 8)}
    t.update(extra)
    return t, shapes


@pytest.mark.parametrize("extra,why", [
    ({"lora_unet_time_embedding_linear_1.lora_up.weight": torch.zeros(8, 2)}, "lora_up.weight without lora_down"),
    ({"lora_unet_time_embedding_linear_1.lora_up.weight": torch.zeros(8, 3),
      "lora_unet_time_embedding_linear_1.lora_down.weight": torch.zeros(2, 8)}, "different ranks"),
    ({"lora_unet_time_embedding_linear_1.lora_up.weight": torch.zeros(8, 2),
      "lora_unet_time_embedding_linear_1.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_time_embedding_linear_1.alpha": torch.zeros(3)}, "alpha holds 3 numbers"),
    ({"lora_unet_time_embedding_linear_1.hada_w1_a": torch.zeros(8, 2)}, "LoHa tensors"),
    ({"lora_unet_time_embedding_linear_1.lokr_w2_a": torch.zeros(4, 2)}, "LoKr factors"),
])
def test_a_module_comfyui_cannot_apply_is_dropped_as_damaged(extra, why):
    """Was KeyError in ComfyUI's LoRA adapter ('... .lora_down.weight') while loading, or an error while patching:
    issue 26."""
    tensors, shapes = _lora(**extra)
    plan = lk.plan_lora(tensors, STUDENT, shapes)
    assert list(plan.to_load) == ["lora_unet_conv_in"]
    assert [p for p, _ in plan.damaged] == ["lora_unet_time_embedding_linear_1"] and why in plan.damaged[0][1]
    assert "dropped, damaged in the file" in plan.summary()


def test_damaged_peft_scale_settings_are_a_typed_error():
    """Was ValueError: could not convert string to float (the PEFT lora_alpha)."""
    t = {"unet.conv_in.lora_A.weight": torch.zeros(2, 8), "unet.conv_in.lora_B.weight": torch.zeros(8, 2)}
    shapes = {f"diffusion_model.{v}.weight": (8, 8) for v in names.module_map(STUDENT).values()}
    for cfg in ({"lora_alpha": "abc"}, {"lora_alpha": 4, "alpha_pattern": {"(": 2}}, {"lora_alpha": [4]}):
        with pytest.raises(LoraError, match="PEFT settings"):
            lk.plan_lora(t, STUDENT, shapes, metadata={"lora_adapter_metadata": json.dumps(cfg)})


def test_the_family_check_reads_no_dimension_a_tensor_lacks():
    """Was IndexError: tuple index out of range (lora_context_dim on a 1-D attn2.to_k down tensor)."""
    assert lk.lora_context_dim({"lora_unet_x_attn2_to_k.lora_down.weight": torch.zeros(4)}) is None


# ------------------------------------------------------------------------------------------------
# VGG16 weights


def test_vgg_weights_that_are_no_table_of_tensors_are_a_typed_error():
    """Was AttributeError on a .pth holding a list or non-tensor values."""
    for tensors in ([torch.zeros(2)], {"features.0.weight": 5}, {0: torch.zeros(2)}):
        with pytest.raises(WeightFileError):
            load_vgg16(tensors, path="vgg16.pth")


def test_save_file_round_trip_still_reads(tmp_path):
    """The stricter header check accepts what safetensors writes: every dtype, empty tensors, metadata."""
    tensors = {f"t{i}": torch.zeros(3, 2, dtype=d) for i, d in enumerate(
        (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
         torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2))}
    tensors["empty"] = torch.zeros(0, 4)
    p = tmp_path / "all.safetensors"
    save_file(tensors, str(p), metadata={"k": "v"})
    shapes, meta = inspect_safetensors(str(p))
    assert {k: v[1] for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert meta == {"k": "v"}
