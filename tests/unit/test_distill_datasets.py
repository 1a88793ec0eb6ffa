"""ComfyUI training datasets (SaveTrainingDataset's shard files) streamed by models/students/distill/datasets.py: the
format ComfyUI 0.33 writes (built here with torch.save exactly as that node does), shard-by-shard reading, the
weights-only loader, the draw order across resolution buckets and process counts."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import datasets as DS

from ..layouts import write_training_dataset


def write_dataset(folder, sizes, shard_size=3, tokens=7, width=16, seed=0):
    """A SaveTrainingDataset folder: per sample a [1, 4, h, w] latent and a [[cond, {pooled_output}]] entry."""
    g = torch.Generator().manual_seed(seed)
    lat = [{"samples": torch.randn(1, 4, h, w, generator=g)} for h, w in sizes]
    cond = [[[torch.randn(1, tokens, width, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
            for _ in sizes]
    write_training_dataset(folder, lat, cond, shard_size)
    return lat, cond


def prepare(latent, cond):
    return latent[0] * 2.0, cond[0][0][0], None


@pytest.mark.parametrize("index", [True, False])
def test_streams_shard_by_shard_and_matches_the_samples(tmp_path, index):
    """Indexed: a batch parses no shard and opens only the files its samples are in; not indexed (the fallback):
    it parses only those shards."""
    sizes = [(4, 4)] * 5 + [(4, 6)] * 3
    lat, cond = write_dataset(tmp_path, sizes)
    ds = DS.ShardedDataset(str(tmp_path), prepare, max_open=1, index=index)
    assert ds.indexed == index
    assert len(ds) == 8 and ds.channels == 4 and ds.context_dim == 16 and ds.max_tokens == 7 and not ds.has_y
    buckets = ds.buckets()
    assert [(s, ix) for s, ix in buckets] == [((4, 4, 4), [0, 1, 2, 3, 4]), ((4, 4, 6), [5, 6, 7])]
    loads = []
    orig = DS.load_shard
    ds.close()
    try:
        DS.load_shard = lambda path, **kw: (loads.append(os.path.basename(path)), orig(path, **kw))[1]
        x0, ctx, y = ds.batch(torch.tensor([4, 3]))
    finally:
        DS.load_shard = orig
    if index:
        assert loads == [] and [os.path.basename(ds.files[s]) for s in ds._open] == ["shard_0001.pkl"]
    else:
        assert loads == ["shard_0001.pkl"], "a batch reads only the shards its samples are in"
    assert torch.equal(x0, torch.stack([lat[4]["samples"][0] * 2, lat[3]["samples"][0] * 2]))
    assert torch.equal(ctx[1], cond[3][0][0][0]) and y is None
    # every sample, both ways, from batches spanning every shard (one file open at a time)
    for picks in ([0, 4, 2, 1, 3], [7, 5, 6]):
        x_all, c_all, _ = ds.batch(torch.tensor(picks))
        for j, i in enumerate(picks):
            assert torch.equal(x_all[j], lat[i]["samples"][0] * 2) and torch.equal(c_all[j], cond[i][0][0][0])
    assert len(ds._open) <= 1 and len(ds._cache) <= 1
    ds.close()


def test_the_index_reads_the_options_the_host_needs(tmp_path):
    """SDXL-like conditioning options (a pooled tensor, sizes) come back from the index as the shard holds them."""
    g = torch.Generator().manual_seed(3)
    lat = [{"samples": torch.randn(1, 4, 4, 4, generator=g)} for _ in range(4)]
    cond = [[[torch.randn(1, 5, 16, generator=g).half(), {"pooled_output": torch.randn(1, 8, generator=g),
                                                           "width": 32 + i, "crop_w": 0}]] for i in range(4)]
    write_training_dataset(tmp_path, lat, cond, 3)
    seen = []

    def keep(latent, c):
        seen.append(c)
        return latent[0], c[0][0][0].float(), c[0][1]["pooled_output"][0]

    ds = DS.ShardedDataset(str(tmp_path), keep)
    assert ds.indexed and ds.has_y
    seen.clear()
    _, ctx, y = ds.batch(torch.tensor([3, 1]))
    assert [s[0][1]["width"] for s in seen] == [33, 35] or [s[0][1]["width"] for s in seen] == [35, 33]
    assert torch.equal(ctx[0], cond[3][0][0][0].float()) and torch.equal(y[1], cond[1][0][1]["pooled_output"][0])
    assert seen[0][0][0].dtype == torch.float16


def test_a_shard_that_needs_a_full_unpickler_is_refused_with_its_name(tmp_path):
    write_dataset(tmp_path, [(4, 4)] * 2, shard_size=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "shard_0001.pkl", "wb") as f:
        torch.save({"latents": [Evil()], "conditioning": [[]]}, f, pickle_module=pickle)
    with pytest.raises(DS.DatasetError) as e:
        DS.ShardedDataset(str(tmp_path), prepare)
    assert "shard_0001.pkl" in str(e.value) and "weights-only" in str(e.value)


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(DS.DatasetError, match="no shard_NNNN.pkl"):
        DS.ShardedDataset(str(tmp_path), prepare)


def test_draws_are_the_same_at_any_process_count_and_stay_in_one_bucket():
    buckets = [((4, 4, 4), list(range(0, 5))), ((4, 4, 6), list(range(5, 8)))]
    for step in range(6):
        one = D.draw_batch(3, step, 0, batch_size=4, grad_accum=1, num_timesteps=1000, buckets=buckets)
        two = [D.draw_batch(3, step, 0, batch_size=2, grad_accum=1, num_timesteps=1000, buckets=buckets, rank=r,
                            world_size=2) for r in range(2)]
        assert torch.equal(one[0], torch.cat([two[0][0], two[1][0]]))
        assert torch.equal(one[1], torch.cat([two[0][1], two[1][1]]))
        assert torch.equal(one[2], torch.cat([two[0][2], two[1][2]]))
        members = [b for b, (_, ix) in enumerate(buckets) if int(one[0][0]) in ix][0]
        assert all(int(i) in buckets[members][1] for i in one[0]), "a micro-batch mixes latent sizes"
        assert one[2].shape[-1] == buckets[members][0][-1]


def test_one_bucket_order_is_the_single_process_order_of_before():
    """Draws with one bucket are those of the engine before buckets and ranks existed (resume compatibility):
    every sample once per epoch in an order seeded by (seed, epoch), noise and timesteps by (seed, step, micro)."""
    n, b = 6, 4
    seen = torch.cat([D.draw_batch(5, s, 0, n_data=n, batch_size=b, grad_accum=1, num_timesteps=10,
                                   sample_shape=(4, 2, 2))[0] for s in range(3)])
    assert sorted(seen[:6].tolist()) == list(range(6)) and sorted(seen[6:12].tolist()) == list(range(6))
    g = D.step_generator(5, "step", 1, 0)
    t = torch.randint(0, 10, (b,), generator=g)
    noise = torch.randn((b, 4, 2, 2), generator=g)
    _, t1, n1 = D.draw_batch(5, 1, 0, n_data=n, batch_size=b, grad_accum=1, num_timesteps=10, sample_shape=(4, 2, 2))
    assert torch.equal(t, t1) and torch.equal(noise, n1)


def test_non_finite_inputs_are_refused_naming_the_input():
    lat = torch.randn(3, 4, 4, 4)
    lat[1, 0, 0, 0] = float("nan")
    with pytest.raises(D.DistillError) as e:
        D.KDData(lat, torch.randn(3, 7, 16), node="DistillStudentUNet")
    assert e.value.input_name == "latents" and "sample 1" in str(e.value)
    ctx = torch.randn(3, 7, 16)
    ctx[2, 3, 1] = float("inf")
    with pytest.raises(D.DistillError) as e:
        D.KDData(torch.randn(3, 4, 4, 4), ctx, inputs=("heldout_latents", "heldout_conditioning"))
    assert e.value.input_name == "heldout_conditioning"
