"""The identity of a dataset on disk: a digest of every shard file's content, computed once and cached.

A run records each shard's digest in its checkpoints, so a resume on data edited in place is refused naming
the shard. Hashing reads every byte: SHA-256 (on the CPU's SHA instructions where it has them, faster than
BLAKE2b there), streamed in 8 MiB chunks (never a whole file in memory), several files at once on a thread
pool (hashlib releases the GIL while it hashes). The digests are kept in a small JSON file
(:data:`CACHE_NAME`) in a folder the caller names (the trainer's ``--out``, the node's checkpoint folder: never
the dataset's own folder, which lies in the user's ComfyUI) and trusted only while a shard's size and
modification time (nanoseconds) are those recorded beside its digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ...files import atomic

log = logging.getLogger("distilled_unets")

CACHE_NAME = "dataset_digests.json"
CHUNK = 8 << 20
ALGORITHM = "sha256"


def file_digest(path: str) -> str:
    """SHA-256 (hex) of a file's content, read in chunks."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _load_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save_cache(path: str, files: dict) -> None:
    try:
        atomic.write_json(path, {"algorithm": ALGORITHM, "files": files}, indent=0, sort_keys=True)
    except OSError as e:  # a read-only folder: the digests are recomputed next time
        log.warning("could not write the dataset digest cache %s (%s)", path, e)


def _hashed(path: str) -> tuple[str, os.stat_result, bool]:
    """(digest, stat before, whether the file stayed the same while it was read)."""
    st = os.stat(path)
    digest = file_digest(path)
    after = os.stat(path)
    return digest, st, (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


class DigestCache:
    """The digests of one cache folder (None: no cache): read at creation, written by :meth:`save` (atomically;
    a caller that must refuse a run first saves only once it may write)."""

    def __init__(self, cache_dir: str | None):
        self.dir = cache_dir
        self.path = os.path.join(cache_dir, CACHE_NAME) if cache_dir else None
        self.entries = _load_cache(self.path) if self.path else {}
        self.dirty = False

    def digests(self, files: list[str], *, workers: int | None = None) -> dict[str, str]:
        """{shard file name: content digest} of ``files`` (one dataset folder): unchanged files (same size and
        mtime as recorded) from the cache, the others hashed, ``workers`` at once (default: the CPU count, at
        most 8)."""
        out: dict[str, str] = {}
        todo = []
        for path in files:
            st = os.stat(path)
            hit = self.entries.get(os.path.abspath(path))
            if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
                out[os.path.basename(path)] = hit["digest"]
            else:
                todo.append(path)
        t0, nbytes = time.perf_counter(), 0
        n = max(1, min(len(todo), workers or min(8, os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=n) as pool:
            for path, (digest, st, stable) in zip(todo, pool.map(_hashed, todo)):
                if stable:  # a file written while it was read is hashed again next time
                    self.entries[os.path.abspath(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                           "digest": digest}
                    self.dirty = True
                out[os.path.basename(path)] = digest
                nbytes += st.st_size
        if todo:
            secs = time.perf_counter() - t0
            log.info("hashed %d shard file(s), %.1f MB, in %.1f s (%.0f MB/s)%s", len(todo), nbytes / 1e6, secs,
                     nbytes / 1e6 / max(secs, 1e-9), f"; digests kept in {self.path}" if self.path else "")
        return {os.path.basename(p): out[os.path.basename(p)] for p in files}

    def save(self) -> None:
        if self.dirty and self.path:
            os.makedirs(self.dir, exist_ok=True)
            _save_cache(self.path, self.entries)
            self.dirty = False


def shard_digests(files: list[str], cache_dir: str | None = None, *, workers: int | None = None) -> dict[str, str]:
    """{shard file name: content digest} of ``files``, through (and into) the cache in ``cache_dir``."""
    cache = DigestCache(cache_dir)
    out = cache.digests(files, workers=workers)
    cache.save()
    return out


def combined(digests: dict[str, str], extra: str = "") -> str:
    """One fingerprint for a set of shard digests (and ``extra``, e.g. the samples' shapes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(sorted(digests.items())).encode())
    h.update(extra.encode())
    return h.hexdigest()


def changed_shards(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two {shard: digest} maps, one phrase per shard (changed, missing, new)."""
    out = [f"{n} changed" for n in sorted(old) if n in new and new[n] != old[n]]
    out += [f"{n} is gone" for n in sorted(old) if n not in new]
    out += [f"{n} is new" for n in sorted(new) if n not in old]
    return out
