# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: what a dataset's true identity costs: hashing every shard file's content once (SHA-256, 8 MiB chunks,
files on a thread pool: ``models/students/distill/fingerprint.py``, as ``tools/distill.py`` does at start), one
file at a time and with the default pool, against reading the same bytes without hashing, and the start of a
later run (digests from the cache: size and mtime only).

A dataset of ``--size-gb`` GB is written under a temporary folder (``--shard-mb`` MB per shard, random bytes:
hashing does not depend on what the bytes are) and deleted afterwards. "cold": the files' pages are dropped
from the page cache first (``posix_fadvise(DONTNEED)`` after ``fsync``: the disk's speed counts); "warm": the
files were just read (page cache; hashing alone counts). Both are the first start of a run on that dataset.

    python bench/bench_dataset_digest.py [--size-gb 3] [--shard-mb 256] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import _device
from _pack import import_pack

CHUNK = 8 << 20


def read_all(paths) -> int:
    buf = bytearray(CHUNK)
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="dataset size (GB, 1e9 bytes)")
    ap.add_argument("--shard-mb", type=int, default=256, help="shard file size (MB)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary dataset is written")
    a = ap.parse_args(argv)
    ph = _device.Phases()
    import_pack()
    from distilled_unets.models.students.distill import fingerprint as FP

    root = tempfile.mkdtemp(prefix="digest_bench_", dir=a.dir)
    try:
        data, cache = os.path.join(root, "data"), os.path.join(root, "out")
        os.makedirs(data)
        shard = a.shard_mb * 10 ** 6
        count = max(1, round(a.size_gb * 1e9 / shard))
        block = os.urandom(1 << 20)
        paths = []
        for i in range(count):
            p = os.path.join(data, f"shard_{i:04d}.pkl")
            with open(p, "wb") as f:
                left = shard
                while left > 0:
                    f.write(block[:min(left, len(block))])
                    left -= len(block)
            paths.append(p)
        total = count * shard
        ph.measuring()
        rows = []
        pool = min(8, os.cpu_count() or 1)
        cold = _device.drop_page_cache(paths)
        t = time.perf_counter()
        FP.shard_digests(paths, cache)
        rows.append((f"hash, first start, {pool} threads" + (" (cold)" if cold else ""), time.perf_counter() - t))
        if cold:
            _device.drop_page_cache(paths)
            t = time.perf_counter()
            read_all(paths)
            rows.append(("read only (cold), no hashing", time.perf_counter() - t))
        t = time.perf_counter()
        read_all(paths)
        rows.append(("read only (warm), no hashing", time.perf_counter() - t))
        for workers in (1, pool) if pool > 1 else (1,):
            os.remove(os.path.join(cache, FP.CACHE_NAME))
            t = time.perf_counter()
            FP.shard_digests(paths, cache, workers=workers)
            rows.append((f"hash, first start, {workers} thread(s) (warm)", time.perf_counter() - t))
        t = time.perf_counter()
        FP.shard_digests(paths, cache)
        rows.append(("later start (digests from the cache)", time.perf_counter() - t))
        ph.setting_up()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nDataset identity: {count} shard files x {a.shard_mb} MB = {total / 1e9:.2f} GB under {a.dir} "
          f"(SHA-256, {CHUNK >> 20} MiB chunks, {os.cpu_count()} CPUs)\n")
    print(f"| {'what':<40} | {'seconds':>8} | {'MB/s':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|")
    for what, secs in rows:
        print(f"| {what:<40} | {secs:8.3f} | {total / 1e6 / max(secs, 1e-9):8.0f} |")
    print()
    print(ph.line())
    print(_device.peak_line("cpu"))


if __name__ == "__main__":
    main()
