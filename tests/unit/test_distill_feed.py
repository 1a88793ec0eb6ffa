"""What feeds the distillation engine (models/students/distill/data.py): the prefetch thread (order, bound, errors,
stop) and the held-out split of a data source (chosen by seed, the same at any number of processes, never drawn
for training)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from distilled_unets.models.students import distill as D


def test_prefetch_gives_every_item_in_order_and_stays_within_its_depth():
    made, lock = [], threading.Lock()
    served = [0]

    def produce(step, micro):
        with lock:
            made.append((step, micro))
            ahead = len(made) - served[0]
        # depth in the queue, one waiting to go in, and the one the consumer holds before counting it
        assert ahead <= 2 + 2, "more items made than the depth allows"
        return torch.full((2,), step * 10 + micro)

    keys = [(s, m) for s in range(3, 9) for m in range(2)]
    feed = D.Prefetcher(produce, keys, depth=2)
    try:
        for s, m in keys:
            time.sleep(0.002)
            item = feed.get(s, m)
            served[0] += 1
            assert torch.equal(item, torch.full((2,), s * 10 + m))
    finally:
        feed.close()
    assert made == keys
    with pytest.raises(RuntimeError, match="nothing more"):
        D.Prefetcher(produce, [], depth=1).get(0, 0)


def test_prefetch_off_makes_each_item_when_asked_and_checks_the_order():
    made = []
    feed = D.Prefetcher(lambda s, m: made.append((s, m)) or s, [(0, 0), (1, 0)], depth=0)
    assert made == [] and feed.get(0, 0) == 0 and made == [(0, 0)]
    with pytest.raises(RuntimeError, match="prefetch order"):
        feed.get(5, 0)


def test_a_read_error_is_raised_by_the_get_of_that_item_and_close_stops_the_thread():
    def produce(step, micro):
        if step == 2:
            raise D.DistillError("shard_0002.pkl is truncated", "remake it")
        return step

    feed = D.Prefetcher(produce, [(s, 0) for s in range(5)], depth=2)
    assert feed.get(0, 0) == 0 and feed.get(1, 0) == 1
    with pytest.raises(D.DistillError, match="truncated"):
        feed.get(2, 0)
    feed.close()
    slow = D.Prefetcher(lambda s, m: time.sleep(0.01) or s, ((s, 0) for s in range(10 ** 6)), depth=2)
    assert slow.get(0, 0) == 0
    thread = slow._thread
    slow.close()
    assert not thread.is_alive()


def test_heldout_indices_are_a_fixed_set_by_seed():
    a = D.heldout_indices(1000, 0.05, seed=0)
    assert a == D.heldout_indices(1000, 0.05, seed=0) and len(a) == 50 and a == sorted(set(a))
    assert a != D.heldout_indices(1000, 0.05, seed=1)
    assert len(D.heldout_indices(10 ** 6, 0.01)) == D.HELDOUT_MAX  # capped
    assert D.heldout_indices(16, 0.01) and len(D.heldout_indices(16, 0.01)) == 1  # at least one
    assert D.heldout_indices(1, 0.5) == [] and D.heldout_indices(100, 0.0) == []
    assert len(D.heldout_indices(3, 0.9)) == 2  # never all of them
    with pytest.raises(D.DistillError, match="held-out fraction"):
        D.heldout_indices(10, 1.0)


def _data(n, shapes=((4, 4), (4, 6))):
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(4, *shapes[i % len(shapes)], generator=g) for i in range(n)]
    return D.KDData(lat, torch.randn(n, 5, 8, generator=g))


def test_heldout_samples_are_never_drawn_for_training_at_any_scale():
    data = _data(40)
    train, held, note = D.split_heldout(data, 0.1, seed=0)
    out = set(held.indices)
    assert len(out) == 4 and len(train) == 36 and "never trained on" in note
    assert set(train.indices).isdisjoint(out) and set(train.indices) | out == set(range(40))
    assert sum(len(ix) for _, ix in train.buckets()) == 36
    buckets = train.buckets()
    drawn = {1: set(), 2: set()}
    for step in range(30):  # several epochs of the training side
        one = D.draw_batch(3, step, 0, batch_size=4, grad_accum=1, num_timesteps=100, buckets=buckets)
        two = [D.draw_batch(3, step, 0, batch_size=2, grad_accum=1, num_timesteps=100, buckets=buckets, rank=r,
                            world_size=2) for r in range(2)]
        assert torch.equal(one[0], torch.cat([two[0][0], two[1][0]]))
        drawn[1] |= set(one[0].tolist())
        drawn[2] |= {i for t in two for i in t[0].tolist()}
    assert drawn[1] == drawn[2] == set(train.indices)
    # the split and the held-out side read through to the source, by global index
    x0, ctx, _ = held.batch(torch.tensor(held.indices[:1]))
    assert torch.equal(x0[0], data.latents[held.indices[0]])
    assert train.fingerprint() != data.fingerprint() != held.fingerprint()
    assert train.fingerprint() == D.split_heldout(data, 0.1, seed=0)[0].fingerprint()
    assert train.fingerprint() != D.split_heldout(data, 0.2, seed=0)[0].fingerprint()
    assert D.split_heldout(data, 0.0)[1] is None and D.split_heldout(data, 0.0)[0] is data
