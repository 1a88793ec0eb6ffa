"""One regression test per raw exception the fuzz suite found behind the nodes, in a real ComfyUI (CPU); each
raised the exception named in its docstring before the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from .._lora_fixtures import lora_for
from . import _mutate as M
from . import _node_readers as NR

pytestmark = pytest.mark.host


def test_a_lora_up_whose_lora_down_lost_a_bit_is_dropped_and_the_rest_applies(tmp_path):
    """Was KeyError: 'lora_unet_..._to_out_0.lora_down.weight' from ComfyUI's LoRA adapter (issue 26); a LoKr module
    without its first factor was AttributeError while patching."""
    from distilled_unets.nodes.lora import DistilledLoraLoader

    model = NR.tiny(NR.STUDENT, seed=1)
    tensors, _, _, _ = lora_for(NR._module_shapes(model, "diffusers"), "kohya", seed=3)
    down = next(k for k in sorted(tensors) if k.endswith("attn1_to_out_0.lora_down.weight"))
    tensors[down.replace("lora_down", "lora_dowm")] = tensors.pop(down)  # one flipped bit in the key
    tensors["lora_unet_time_embed_0.lokr_w2_a"] = torch.zeros(4, 2)  # a LoKr module with only one factor
    save_file(tensors, str(tmp_path / "flipped.safetensors"))
    with NR.registered("loras", tmp_path):
        new, _, report = DistilledLoraLoader.execute(model=model, lora_name="flipped.safetensors", strength_model=1.0,
                                                     strength_clip=1.0).args
    assert "dropped, damaged in the file (adapter tensors missing or inconsistent): 2" in report
    assert down[: -len(".lora_down.weight")] in report
    NR.lora_works((new, None, report))  # patches without a ComfyUI error, forward pass, the input MODEL unchanged


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return NR.make_checkpoints(tmp_path_factory.mktemp("ckpt"))["checkpoint"]


def _damaged(checkpoint, tmp_path, edit_meta=None, edit_tensors=None):
    from safetensors.torch import load_file

    header, body = M.split_safetensors(checkpoint.read_bytes())
    meta = dict(header["__metadata__"])
    if edit_meta:
        meta.update(edit_meta)
    sd = load_file(str(checkpoint))
    if edit_tensors:
        edit_tensors(sd)
    p = tmp_path / "damaged.safetensors"
    save_file(sd, str(p), metadata=meta)
    return p


@pytest.mark.parametrize("meta,tensors,match", [
    ({"config": "[]"}, None, "config is not the run's settings"),                       # AttributeError
    ({"skipped_steps": "[1, "}, None, "skipped_steps is not a JSON list"),              # JSONDecodeError
    ({"step": "2.5"}, None, "step '2.5' is not a step number"),                         # ValueError
    (None, lambda sd: sd.update({k: torch.zeros(3) for k in sd if k.startswith("ema.")}), "has shape"),  # RuntimeError
    (None, lambda sd: sd["student.out.2.weight"].fill_(float("nan")), "holds NaN"),     # NonFiniteError, no file
    (None, lambda sd: sd.pop("history.loss"), "no history.loss"),                        # SafetensorError
], ids=["config", "skipped_steps", "step", "ema shape", "nan weight", "no loss history"])
def test_a_damaged_checkpoint_is_refused_naming_the_node_the_input_and_the_file(checkpoint, tmp_path, meta, tensors,
                                                                                match):
    """Each raised the exception in its comment (or an error naming no node or input) before the fix."""
    from distilled_unets.models.students.distill import CheckpointError

    p = _damaged(checkpoint, tmp_path, meta, tensors)
    with pytest.raises(CheckpointError, match=match) as e:
        NR.resume(p)
    assert (e.value.node, e.value.input_name) == (NR.NODE, "resume_from") and p.name in str(e.value)


def test_a_dataset_sample_of_two_conditionings_is_refused_when_the_data_open(tmp_path):
    """Was a DistillError naming no file, raised by the first batch that drew the sample (mid-training)."""
    from distilled_unets.models.students.distill.datasets import DatasetError

    folder = NR.make_datasets(tmp_path / "made")["one size"]
    shard = folder / "shard_0002.pkl"
    d = torch.load(str(shard), weights_only=True)
    d["conditioning"][-1] = d["conditioning"][-1] * 2
    torch.save(d, str(shard))
    with NR.registered("datasets", tmp_path / "made"), pytest.raises(DatasetError) as e:
        NR.open_dataset(folder)
    assert "shard_0002.pkl" in str(e.value) and (e.value.node, e.value.input_name) == ("DistillStudentUNet", "data")


def test_vgg_weights_holding_a_list_are_refused_by_the_node(tmp_path):
    """Was AttributeError: 'list' object has no attribute ... (load_vgg16 on what the .pth held)."""
    from distilled_unets.models.errors import WeightFileError

    torch.save([torch.zeros(2)], str(tmp_path / "vgg16.pth"))
    with NR.registered("vgg", tmp_path), pytest.raises(WeightFileError) as e:
        NR.read_vgg(tmp_path / "vgg16.pth")
    assert (e.value.node, e.value.input_name) == ("DistillStudentUNet", "vgg16") and "vgg16.pth" in str(e.value)


def test_a_damaged_peft_lora_names_the_node(tmp_path):
    """Was ValueError: could not convert string to float: 'abc' (the PEFT lora_alpha), naming nothing."""
    from distilled_unets.models.errors import LoraError
    from distilled_unets.nodes.lora import DistilledLoraLoader

    model = NR.tiny(NR.STUDENT, seed=1)
    tensors, meta, _, _ = lora_for(NR._module_shapes(model, "diffusers"), "peft", seed=3)
    meta["lora_adapter_metadata"] = json.dumps({"unet.lora_alpha": "abc"})
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata=meta)
    with NR.registered("loras", tmp_path), pytest.raises(LoraError) as e:
        DistilledLoraLoader.execute(model=model, lora_name="peft.safetensors", strength_model=1.0, strength_clip=1.0)
    assert (e.value.node, e.value.input_name) == ("DistilledLoraLoader", "lora_name")
    assert "peft.safetensors" in str(e.value)
