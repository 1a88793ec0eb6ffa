"""A run's identity and its folder, without ComfyUI: shard content digests and their cache
(models/students/distill/fingerprint.py), the dataset fingerprint that follows content, and the run folder's
records (models/students/distill/runs.py): run.json, csv logs, the disk plan and its refusal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from distilled_unets.models.students import distill as D
from distilled_unets.models.students.distill import datasets as DS
from distilled_unets.models.students.distill import fingerprint as FP
from distilled_unets.models.students.distill import runs

from .test_distill_datasets import prepare, write_dataset


def test_file_digest_is_sha256_of_the_content_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(FP, "CHUNK", 1000)  # several chunks and a short last one
    data = os.urandom(4321)
    (tmp_path / "f").write_bytes(data)
    assert FP.file_digest(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


def test_digests_are_cached_and_trusted_only_while_size_and_mtime_match(tmp_path, monkeypatch):
    write_dataset(tmp_path / "data", [(4, 4)] * 6, shard_size=2)
    files = DS.shard_files(str(tmp_path / "data"))
    hashed = []
    real = FP.file_digest
    monkeypatch.setattr(FP, "file_digest", lambda p: hashed.append(os.path.basename(p)) or real(p))
    cache = str(tmp_path / "out")
    first = FP.shard_digests(files, cache)
    assert sorted(first) == ["shard_0000.pkl", "shard_0001.pkl", "shard_0002.pkl"] and len(hashed) == 3
    assert json.load(open(os.path.join(cache, FP.CACHE_NAME)))["algorithm"] == FP.ALGORITHM
    hashed.clear()
    assert FP.shard_digests(files, cache) == first and hashed == []  # all from the cache
    # one shard edited in place: only it is hashed again, and its digest changes
    d = torch.load(files[1], weights_only=True)
    d["latents"][0]["samples"].add_(1.0)
    torch.save(d, files[1])
    again = FP.shard_digests(files, cache)
    assert hashed == ["shard_0001.pkl"] and again["shard_0001.pkl"] != first["shard_0001.pkl"]
    assert FP.changed_shards(first, again) == ["shard_0001.pkl changed"]
    assert FP.changed_shards(first, {k: v for k, v in first.items() if k != "shard_0002.pkl"}) == \
        ["shard_0002.pkl is gone"]
    # without a cache folder nothing is written, everything is hashed
    hashed.clear()
    FP.shard_digests(files)
    assert len(hashed) == 3


def test_the_dataset_fingerprint_follows_content_not_names_and_sizes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, [(4, 4)] * 4, shard_size=2, seed=1)
    shutil.copytree(a, b)
    d = torch.load(b / "shard_0001.pkl", weights_only=True)
    d["latents"][1]["samples"].mul_(-1.0)  # same size, same shapes, other values
    with open(b / "shard_0001.pkl", "wb") as f:  # as Save Training Dataset writes (the same archive name)
        torch.save(d, f)
    assert os.path.getsize(a / "shard_0001.pkl") == os.path.getsize(b / "shard_0001.pkl")
    da, db = DS.ShardedDataset(str(a), prepare), DS.ShardedDataset(str(b), prepare)
    assert da.layout_fingerprint() == db.layout_fingerprint()  # what checkpoints recorded before digests
    assert da.fingerprint() != db.fingerprint()
    assert FP.changed_shards(da.shard_digests(), db.shard_digests()) == ["shard_0001.pkl changed"]


def test_run_json_is_written_atomically_and_differences_are_named(tmp_path):
    ident = {"--lr": 5e-5, "--batch-size x processes": 4, "--data": "a"}
    runs.write_run_file(str(tmp_path), {"run": "k", "identity": ident})
    assert os.listdir(tmp_path) == ["run.json"]
    rec = runs.read_run_file(str(tmp_path))
    assert rec["identity"] == ident and rec["format"] == runs.RUN_FORMAT
    assert runs.identity_differences(ident, dict(ident, **{"--lr": 1e-4, "--batch-size x processes": 1})) == [
        "--lr (5e-05 -> 0.0001)", "--batch-size x processes (4 -> 1)"]
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(D.RunFolderError, match="run.json cannot be read"):
        runs.read_run_file(str(tmp_path))


def test_an_output_folder_that_is_a_file_is_a_typed_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(D.RunFolderError, match="names an existing file") as e:
        runs.check_folder(str(tmp_path / "f"))
    assert e.value.input_name == "out"
    assert runs.check_folder(str(tmp_path / "new")) == str(tmp_path / "new")


def test_csv_logs_restart_from_the_history_and_append(tmp_path):
    log = runs.loss_log(str(tmp_path))
    log.start(runs.loss_rows(([0.5, float("nan")], {"task": [0.25, float("nan")], "out": [0.125, 0.0]}, [1])))
    log.row({"step": 3, "loss": 0.4, "task": 0.2, "out": 0.1, "skipped": 0})
    log.close()
    rows = runs.read_csv(str(tmp_path / "losses.csv"))
    assert list(rows[0]) == ["step", "loss", "task", "out", "skipped"]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["skipped"] for r in rows] == [0, 1, 0]
    assert rows[0]["loss"] == 0.5 and rows[2]["out"] == 0.1
    ev = runs.eval_log(str(tmp_path))
    ev.start([{"step": 0, "heldout_kd": 0.3}])
    ev.row({"step": 2, "heldout_kd": 0.2})
    ev.close()
    assert runs.read_csv(str(tmp_path / "eval.csv")) == [{"step": 0, "heldout_kd": 0.3}, {"step": 2, "heldout_kd": 0.2}]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".writing")]


FakeRun = namedtuple("FakeRun", "cfg trainable_params checkpoint_bytes")


def test_the_disk_plan_counts_the_kept_checkpoints_the_student_and_the_best(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 << 30, 0, 9 << 30))
    cfg = D.DistillConfig(steps=50_000, checkpoint_every=1000, checkpoint_dir=str(tmp_path), keep_checkpoints=2)
    run = FakeRun(cfg, 500_000_000, lambda: 2 << 30)
    with pytest.raises(D.DiskSpaceError) as e:  # 3 x 2 GiB + 1 GiB student + 2 x 1 GiB best = 9 GiB > 95 % of 9
        runs.plan_run_disk(str(tmp_path / "new" / "run"), run, student_bytes=1 << 30, best=True, held_paths=[])
    msg = str(e.value)
    assert "one checkpoint weighs 2.00 GiB" in msg and "3 checkpoints" in msg and "9.00 GiB is free" in msg
    assert "--keep-checkpoints 1" in msg and "--ema-decay 0" in msg and e.value.input_name == "out"
    plan = runs.plan_run_disk(str(tmp_path), run, student_bytes=1 << 30, best=False, held_paths=[])
    assert plan.held == 3 and plan.peak == 3 * (2 << 30) + (1 << 30) + 256 * 1024
    # every checkpoint kept (keep 0): 51 of them; the node's names in the fixes
    cfg0 = D.DistillConfig(steps=50_000, checkpoint_every=1000, checkpoint_dir=str(tmp_path), keep_checkpoints=0)
    with pytest.raises(D.DiskSpaceError, match="51 checkpoints") as e:
        runs.plan_run_disk(str(tmp_path), FakeRun(cfg0, 1, lambda: 1 << 30), student_bytes=0, best=False,
                           held_paths=[], names=runs.INPUT_NAMES, node="DistillStudentUNet")
    assert "keep_checkpoints 1" in str(e.value) and e.value.node == "DistillStudentUNet"
