# ruff: noqa: T201  (the runs print their loss curves; see them with -s)
"""DistillStudentUNet on ComfyUI's own training-data formats, LoadDistillationDataset, and "never a broken
student" (non-finite inputs refused before the first step, non-finite steps skipped, a streak stopped with the
last good weights, SaveStudentUNet refusing non-finite weights).

The lists come from ComfyUI 0.33's own dataset nodes where the test says so (``MakeTrainingDataset``'s output
shape, ``SaveTrainingDataset`` / ``LoadTrainingDataset`` / ``ResolutionBucket`` run for real); ComfyUI 0.3.64
has none of them and those tests skip there. Shard folders written here by ``torch.save`` in the layout
``SaveTrainingDataset`` writes run on both versions. Tiny widths, CPU, seeded.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from ..layouts import write_training_dataset
from . import test_distill as TD
from .test_distill import NODE_KW, fmt

env, node_env = TD.env, TD.node_env  # the tiny teacher and students of test_distill.py (module fixtures)

SEED_LAT = 5


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    """A private datasets folder registered in folder_paths (ComfyUI 0.33's entry, or the one the pack adds)."""
    import folder_paths

    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "datasets", ([str(root)], set()))
    return root


@pytest.fixture(scope="module")
def dataset_nodes():
    try:
        from comfy_extras import nodes_dataset as nd
    except ImportError:
        nd = None
    if nd is None or not hasattr(nd, "SaveTrainingDataset"):
        pytest.skip("this ComfyUI has no training-dataset nodes (Make / Save / Load Training Dataset, Resolution "
                    "Bucket: ComfyUI 0.33 or newer)")
    return nd


def captions(n, *, tokens=8, seed=1):
    """n CONDITIONINGs as Make Training Dataset's CLIP encoding gives them (one entry each)."""
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(1, tokens, 768, generator=g), {}]] for _ in range(n)]


def latent_list(n, size=8, *, seed=SEED_LAT, sizes=None):
    """n LATENT dicts as Make Training Dataset gives them (one [1, 4, h, w] sample each)."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [(size, size)] * n
    return [{"samples": torch.randn(1, 4, h, w, generator=g)} for h, w in sizes]


def executor_call(N, student, teacher, **kw):
    """DistillStudentUNet.execute as ComfyUI's executor calls an is_input_list node: every input a list (one value
    each; latents/conditioning as they came: one LATENT/CONDITIONING, or the list of a list-output node)."""
    args = dict(NODE_KW, **kw)
    listed = {k: (v if k in ("latents", "conditioning", "heldout_latents", "heldout_conditioning") else [v])
              for k, v in args.items()}
    with torch.inference_mode():
        return N.DistillStudentUNet.execute(student=[student], teacher=[teacher], **listed).args


def load_data(name, saved_latents=None, heldout_fraction=0.0):
    """Load Distillation Dataset's output (nothing held out unless asked: these tests compare whole datasets)."""
    from distilled_unets.nodes import datasets as DN

    return DN.LoadDistillationDataset.execute([name], saved_latents, [heldout_fraction]).args[0]


# ---- ComfyUI's list formats -------------------------------------------------------------------------


def test_lists_train_exactly_like_one_batch(node_env):
    """Make Training Dataset's lists (one LATENT and one CONDITIONING per image) give the run one LATENT batch
    with the same captions gives: the same samples, the same draws, the same losses."""
    N, teacher, _, bk_small, _, _ = node_env
    lats, conds = latent_list(6), captions(6)
    batch = {"samples": torch.cat([x["samples"] for x in lats])}
    combined = [c[0] for c in conds]  # Conditioning (Combine): one entry per latent, in order
    _, as_batch, rep_batch = executor_call(N, bk_small, teacher, latents=[batch], conditioning=[combined])
    _, as_lists, rep_lists = executor_call(N, bk_small, teacher, latents=lats, conditioning=conds)
    print(f"\none batch {fmt(as_batch['loss'])}\nlists     {fmt(as_lists['loss'])}")
    assert as_lists["loss"] == as_batch["loss"] and all(math.isfinite(x) for x in as_lists["loss"])
    assert "the last 1 of 6 samples" in rep_lists
    # one caption for all: the conditioning is converted once and shared
    data = N.make_data(teacher, lats, conds[:1], which="train")
    assert len(data) == 6 and len(data._ctx) == 1


def test_one_caption_list_for_many_latents_and_mismatches_are_refused(node_env):
    from distilled_unets.models.students.distill import DistillError

    N, teacher, _, _, _, _ = node_env
    lats = latent_list(4)
    with torch.inference_mode(False):
        data = N.make_data(teacher, lats, captions(4), which="train")
        assert len(data) == 4 and len(data._ctx) == 4
        assert torch.equal(data._ctx[2], captions(4)[2][0][0][0])  # sample 2 got caption 2
        with pytest.raises(DistillError) as e:
            N.make_data(teacher, lats, captions(3), which="train")
    assert "3 conditionings for 4 latent batches" in str(e.value) and "input 'conditioning'" in str(e.value)


def test_resolution_buckets_pair_every_latent_with_its_caption(node_env, dataset_nodes):
    """ComfyUI 0.33's ResolutionBucket regroups latents by size (one [B_i, C, H_i, W_i] per bucket); the node
    keeps each caption with its image and draws every micro-batch from one size."""
    N, teacher, _, bk_small, _, _ = node_env
    sizes = [(8, 8), (8, 12), (8, 8), (8, 12), (8, 8)]
    lats, conds = latent_list(5, sizes=sizes), captions(5)
    b_lat, b_cond = dataset_nodes.ResolutionBucket.execute(lats, conds).args
    assert len(b_lat) == 2 and [x["samples"].shape[0] for x in b_lat] == [3, 2]
    with torch.inference_mode(False):
        data = N.make_data(teacher, b_lat, b_cond, which="train")
    assert sorted(len(ix) for _, ix in data.buckets()) == [2, 3]
    scale = teacher.model.latent_format.scale_factor
    for i in range(len(data)):  # each sample's caption is the one its image came with
        x = data.latents[i]
        j = next(j for j, lat in enumerate(lats) if lat["samples"].shape[-2:] == x.shape[-2:]
                 and torch.allclose(lat["samples"][0] * scale, x))
        assert torch.equal(data._ctx[i], conds[j][0][0][0])
    _, loss_map, report = executor_call(N, bk_small, teacher, latents=b_lat, conditioning=b_cond, steps=4,
                                        batch_size=1)
    assert len(loss_map["loss"]) == 4 and all(math.isfinite(x) for x in loss_map["loss"])


def test_saved_loaded_and_streamed_datasets_train_alike(node_env, dataset_nodes, datasets_root):
    """Make Training Dataset's lists in memory, the same saved by ComfyUI's SaveTrainingDataset and read back
    by LoadTrainingDataset, and the same streamed by LoadDistillationDataset: one loss curve."""
    N, teacher, _, bk_small, _, _ = node_env
    lats, conds = latent_list(7), captions(7)
    held_l, held_c = latent_list(2, seed=99), captions(2, seed=98)
    dataset_nodes.SaveTrainingDataset.execute(lats, conds, ["run1"], [3])
    assert sorted(os.listdir(datasets_root / "run1")) == ["metadata.json", "shard_0000.pkl", "shard_0001.pkl",
                                                          "shard_0002.pkl"]
    loaded_l, loaded_c = dataset_nodes.LoadTrainingDataset.execute("run1").args
    kw = dict(heldout_latents=held_l, heldout_conditioning=held_c, steps=4)
    _, mem, _ = executor_call(N, bk_small, teacher, latents=lats, conditioning=conds, **kw)
    _, loaded, _ = executor_call(N, bk_small, teacher, latents=loaded_l, conditioning=loaded_c, **kw)
    data = load_data("run1", saved_latents=lats)
    _, streamed, report = executor_call(N, bk_small, teacher, data=data, **kw)
    print(f"\nin memory {fmt(mem['loss'])}\nloaded    {fmt(loaded['loss'])}\nstreamed  {fmt(streamed['loss'])}")
    assert loaded["loss"] == mem["loss"]
    assert streamed["loss"] == pytest.approx(mem["loss"], rel=1e-6)
    assert "training data: 7 samples in 3 shards (run1), latents 64x64" in report
    assert "held-out samples: the held-out inputs" in report


# ---- LoadDistillationDataset ------------------------------------------------------------------------


def test_loader_lists_streams_and_refuses(node_env, datasets_root):
    from distilled_unets.models.students.distill.datasets import DatasetError
    from distilled_unets.nodes import datasets as DN

    N, teacher, _, bk_small, _, _ = node_env
    write_training_dataset(datasets_root / "proj" / "a", latent_list(5), captions(5))
    (datasets_root / "empty").mkdir()
    assert DN.dataset_choices() == ["proj/a"]
    assert "proj/a" in DN.LoadDistillationDataset.define_schema().inputs[0].options
    data = load_data("proj/a")
    assert data.folder == os.path.realpath(datasets_root / "proj" / "a")
    _, loss_map, report = executor_call(N, bk_small, teacher, data=data, steps=3)
    assert len(loss_map["loss"]) == 3 and "5 samples in 2 shards (a)" in report
    assert "held-out samples: none (" in report
    # names that leave the datasets folder, or name nothing there
    v = DN.LoadDistillationDataset.validate_inputs
    assert v(["proj/a"]) is True and v(["not/yet/saved"]) is True  # saved in the same run: checked when it runs
    for bad in ("../outside", "/etc", "proj/../../x", ""):
        assert isinstance(v([bad]), str), bad
        with pytest.raises(DatasetError) as e:
            load_data(bad)
        assert "[LoadDistillationDataset, input 'folder_name']" in str(e.value)
    with pytest.raises(DatasetError, match="no dataset folder 'missing'") as e:
        load_data("missing")
    assert "Save Training Dataset" in str(e.value) and "0.33" in str(e.value)
    with pytest.raises(DatasetError, match="no shard_NNNN.pkl"):
        load_data("empty")
    with pytest.raises(DatasetError, match="the folder holds 5 samples, the latents connected to saved_latents "
                                           "are 4"):
        load_data("proj/a", saved_latents=latent_list(4))
    # a dataset saved again under the same name is a new input for ComfyUI's cache
    before = DN.LoadDistillationDataset.fingerprint_inputs(["proj/a"])
    write_training_dataset(datasets_root / "proj" / "a", latent_list(6), captions(6))
    assert DN.LoadDistillationDataset.fingerprint_inputs(["proj/a"]) != before


class NotATensor:  # a class torch's weights-only loader does not allow
    pass


def test_a_shard_needing_a_full_unpickler_is_refused_by_name(node_env, datasets_root):
    from distilled_unets.models.students.distill.datasets import DatasetError

    N, teacher, _, bk_small, _, _ = node_env
    write_training_dataset(datasets_root / "odd", latent_list(4), captions(4), shard_size=2)
    with open(datasets_root / "odd" / "shard_0001.pkl", "wb") as f:
        torch.save({"latents": [NotATensor()], "conditioning": [[]]}, f)
    with pytest.raises(DatasetError) as e:
        executor_call(N, bk_small, teacher, data=load_data("odd"))
    msg = str(e.value)
    assert msg.startswith("[DistillStudentUNet, input 'data'] the shard needs more than the weights-only loader")
    assert "shard_0001.pkl" in msg and "Fix:" in msg


def test_loader_registers_the_datasets_folder_on_every_version():
    import folder_paths
    from distilled_unets.nodes import NODE_CLASSES
    from distilled_unets.nodes import datasets as DN

    assert DN.LoadDistillationDataset in NODE_CLASSES
    s = DN.LoadDistillationDataset.define_schema()
    assert s.node_id == "LoadDistillationDataset" and s.category == "distilled_unets/distill"
    assert "ComfyUI 0.33" in s.inputs[0].tooltip and "0.33" in s.description
    assert folder_paths.get_folder_paths("datasets")  # ComfyUI 0.33's entry, or the pack's on 0.3.64


def test_exactly_one_data_form(node_env, datasets_root):
    from distilled_unets.models.students.distill import DistillError

    N, teacher, _, bk_small, latents, pos = node_env
    write_training_dataset(datasets_root / "d", latent_list(3), captions(3))
    data = load_data("d")
    cases = [({}, "latents", "no training data is connected"),
             (dict(latents=[latents], conditioning=[pos], data=data), "data", "two forms of training data"),
             (dict(latents=[latents]), "conditioning", "latents without conditioning"),
             (dict(conditioning=[pos]), "latents", "conditioning without latents")]
    for kw, inp, text in cases:
        with pytest.raises(DistillError) as e:
            executor_call(N, bk_small, teacher, **kw)
        assert f"[DistillStudentUNet, input '{inp}'] {text}" in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(DistillError, match="2 values arrive at steps"):
        with torch.inference_mode():
            N.DistillStudentUNet.execute(student=[bk_small], teacher=[teacher], latents=[latents], conditioning=[pos],
                                         **{k: ([v, v] if k == "steps" else [v]) for k, v in NODE_KW.items()})


# ---- never a broken student -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["latents", "conditioning", "list"])
def test_non_finite_inputs_refused_before_the_first_step(node_env, monkeypatch, where):
    from distilled_unets.models.students.distill import DistillError

    N, teacher, _, bk_small, latents, pos = node_env
    calls = []
    monkeypatch.setattr(N.comfy.utils, "ProgressBar", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(N.mm, "load_models_gpu", lambda *a, **k: calls.append(a))
    lat, cond = latents, pos
    if where == "latents":
        lat = {"samples": latents["samples"].clone()}
        lat["samples"][3, 1, 2, 2] = float("nan")
        lat, cond = [lat], [cond]
    elif where == "conditioning":
        cond = [[[pos[0][0].clone(), pos[0][1]]]]
        cond[0][0][0][0, 0, 0] = float("inf")
        lat = [lat]
    else:  # Make Training Dataset's lists, image 2 broken
        lat, cond = latent_list(4), captions(4)
        lat[2]["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(DistillError) as e:
        executor_call(N, bk_small, teacher, latents=lat, conditioning=cond)
    msg = str(e.value)
    print(f"\n{msg}")
    inp = "conditioning" if where == "conditioning" else "latents"
    assert msg.startswith(f"[DistillStudentUNet, input '{inp}'] ") and "NaN or infinite" in msg and "Fix:" in msg
    assert {"latents": "sample 3", "list": "sample 2"}.get(where, "") in msg
    assert not calls  # nothing loaded, no step


def test_a_bad_shard_skips_its_step_and_the_report_says_so(node_env, datasets_root):
    """One image with NaN latents in a streamed dataset (not looked for up front: that would read it all): the
    steps that draw it are skipped (no weight changes), the others train, the report lists the skipped steps."""
    N, teacher, _, bk_small, _, _ = node_env
    lats = latent_list(6)
    lats[4]["samples"][0, 2, 3, 3] = float("nan")
    write_training_dataset(datasets_root / "bad", lats, captions(6))
    model, loss_map, report = executor_call(N, bk_small, teacher, data=load_data("bad"), steps=6, batch_size=1)
    print(f"\nbad shard: loss {fmt(loss_map['loss'])}\n{report}")
    m = re.search(r"skipped (\d+) step\(s\) with a non-finite loss or gradient: (\d+)", report)
    assert m and m.group(1) == "1"  # one epoch of 6 samples at batch 1: the broken one is drawn once
    bad = int(m.group(2))
    assert all(math.isfinite(x) for x in loss_map["loss"]), "Plot Loss Graph gets finite values"
    assert bad == 0 or loss_map["loss"][bad] == loss_map["loss"][bad - 1]  # the skipped step repeats the last
    assert "distilled 6 of 6 steps" in report
    assert all(torch.isfinite(v).all() for v in model.model.diffusion_model.state_dict().values())


def test_a_streak_of_non_finite_steps_stops_with_the_last_good_weights(node_env, tmp_path, monkeypatch):
    import folder_paths
    from distilled_unets.models.students.distill import NonFiniteError, read_checkpoint_meta
    from distilled_unets.models.students.distill import step as S

    N, teacher, _, bk_small, latents, pos = node_env
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    real, calls = S.micro_loss, []

    def overflow_from_step_2(run, forward, nb, ctx, y):  # an fp16 overflow from step 2 on, as it would show
        loss, parts = real(run, forward, nb, ctx, y)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) > 2 else (loss, parts)

    monkeypatch.setattr(S, "micro_loss", overflow_from_step_2)
    with pytest.raises(NonFiniteError) as e:
        executor_call(N, bk_small, teacher, latents=[latents], conditioning=[pos], steps=10, checkpoint_every=100,
                      run_name="streak")
    msg = str(e.value)
    print(f"\n{msg}")
    assert msg.startswith("[DistillStudentUNet, input 'learning_rate'] steps 2-6 (5 in a row) had a non-finite loss")
    assert e.value.step == 2 and e.value.checkpoint and os.path.isfile(e.value.checkpoint)
    assert e.value.checkpoint in msg and "streak" in e.value.checkpoint
    assert read_checkpoint_meta(e.value.checkpoint)["step"] == "7"
    good = e.value.result.state_dict
    assert all(torch.isfinite(v).all() for v in good.values())
    assert len(calls) == 7  # stopped at once: steps 7-9 never ran


def test_save_student_refuses_non_finite_weights(tm, models_dir):
    from distilled_unets.models.errors import PackError
    from distilled_unets.nodes import students

    model = tm.build("sd15", tm.MINI_TOPOLOGY, seed=3)
    w = model.model.diffusion_model.out[2].weight
    with torch.no_grad():
        w[0, 0, 0, 0] = float("nan")
    with pytest.raises(PackError) as e:
        students.SaveStudentUNet.execute(model, "students/broken", "fp16")
    msg = str(e.value)
    assert msg.startswith("[SaveStudentUNet, input 'model'] 1 of ") and "out.2.weight" in msg
    assert "nothing was written" in msg and "Fix:" in msg
    with torch.no_grad():
        w[0, 0, 0, 0] = 7e4  # finite, beyond fp16's range
    with pytest.raises(PackError) as e:
        students.SaveStudentUNet.execute(model, "students/broken", "fp16")
    assert str(e.value).startswith("[SaveStudentUNet, input 'dtype'] 1 weight tensors do not fit fp16")
    assert not any(files for _, _, files in os.walk(models_dir / "diffusion_models"))
    path = students.SaveStudentUNet.execute(model, "students/fine", "fp32").args[0]
    assert os.path.isfile(path)  # bf16/fp32 hold it


# ---- workflows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["distill_student_sd15.json", "distill_from_dataset_sd15.json"])
def test_distill_workflows_match_the_node_schemas(name):
    from ._workflows import check_pack_nodes, load

    wf = load(name)
    check_pack_nodes(wf)
    types = {n["type"] for n in wf["nodes"]}
    assert "LatentBatch" not in types and "DistillStudentUNet" in types
