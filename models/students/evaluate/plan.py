"""What is generated: the (prompt, seed) pairs, their file names, each process's share, and the manifest that
says whether images already on disk were made with the same model and settings.

Image ``k`` of prompt ``p`` (``k = 0 .. images_per_prompt - 1``) uses seed ``seed + k``, the same for every
prompt (the images of one prompt differ by seed; the prompts of one seed share their noise) and for the teacher
and every student. Pairs are numbered ``i = p x images_per_prompt + k`` and written as ``NNNNNN.png`` (``i`` in
six digits). Under ``torchrun`` rank ``r`` of ``w`` takes the pairs with ``i % w == r``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ...files import atomic
from .errors import EvaluationError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Pair:
    index: int    # i = prompt x images_per_prompt + k
    prompt: int   # index into the prompt list
    k: int        # image k of that prompt
    seed: int     # seed + k

    @property
    def file_name(self) -> str:
        return f"{self.index:06d}.png"


#: a longer prompt is refused (CLIP reads 77 tokens a chunk; ComfyUI encodes every chunk of a long prompt)
MAX_PROMPT_CHARS = 10_000
#: a larger prompt file is refused unread (MS-COCO's 30K val2014 captions take 1.6 MB)
MAX_PROMPT_FILE = 64 << 20


def parse_prompts(text: str | list[str], *, input_name: str = "prompts", node: str | None = None,
                  path: str | None = None) -> list[str]:
    """One prompt a line (blank lines skipped); an empty list, a line with NUL characters (binary data) or a line
    longer than :data:`MAX_PROMPT_CHARS` is refused."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts = [p.strip() for p in lines if p and p.strip()]
    fix = "write one prompt a line, as text"
    for i, p in enumerate(prompts):
        if "\x00" in p:
            raise EvaluationError(f"prompt {i + 1} holds NUL characters: this is binary data, not text", fix,
                                  path=path, node=node, input_name=input_name)
        if len(p) > MAX_PROMPT_CHARS:
            raise EvaluationError(f"prompt {i + 1} is {len(p):,} characters long (at most {MAX_PROMPT_CHARS:,})",
                                  "shorten it (CLIP reads 77 tokens at a time; the rest only adds chunks)",
                                  path=path, node=node, input_name=input_name)
    if not prompts:
        raise EvaluationError("the prompt list is empty", "write at least one prompt, one a line", path=path,
                              node=node, input_name=input_name)
    return prompts


def read_prompt_file(path: str, *, input_name: str = "prompts") -> list[str]:
    """The prompts of a text file (UTF-8, a byte-order mark allowed; one prompt a line): see :func:`parse_prompts`.
    Errors name the file."""
    fix = "give a UTF-8 text file, one prompt a line"
    try:
        size = os.path.getsize(path)
        if size > MAX_PROMPT_FILE:
            raise EvaluationError(f"the prompt file is {size:,} bytes (at most {MAX_PROMPT_FILE:,})",
                                  "split the prompts into several runs", path=path, input_name=input_name)
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPT_FILE + 1)
    except OSError as e:
        raise EvaluationError(f"the prompt file cannot be read ({e.strerror or e})", fix, path=path,
                              input_name=input_name) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"the prompt file is not UTF-8 text (byte {e.start:,} cannot be decoded)", fix,
                              path=path, input_name=input_name) from e
    return parse_prompts(text, input_name=input_name, path=path)


def pairs(n_prompts: int, images_per_prompt: int, seed: int) -> list[Pair]:
    if images_per_prompt < 1:
        raise EvaluationError(f"images per prompt is {images_per_prompt}", "give 1 or more",
                              input_name="images_per_prompt")
    return [Pair(p * images_per_prompt + k, p, k, seed + k) for p in range(n_prompts)
            for k in range(images_per_prompt)]


def share(all_pairs: list[Pair], rank: int, world: int) -> list[Pair]:
    """The pairs rank ``rank`` of ``world`` generates (``i % world == rank``)."""
    return [p for p in all_pairs if p.index % world == rank]


def settings_key(settings: dict) -> str:
    """A short hash of settings (JSON-serialisable, order-free)."""
    raw = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def file_identity(path: str, *, full_hash_below: int = 64 * 2**20) -> dict:
    """What identifies a model file: name, size and mtime, plus a content hash for files up to 64 MiB (a hash of
    a 5 GB checkpoint on every run would cost more than it saves)."""
    st = os.stat(path)
    out = {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= full_hash_below:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["blake2b"] = h.hexdigest()
    return out


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(folder: str, manifest: dict) -> None:
    """``folder/manifest.json``, written to a temporary file and renamed (never half-written)."""
    os.makedirs(folder, exist_ok=True)
    atomic.write_json(os.path.join(folder, MANIFEST), manifest, indent=1, sort_keys=True)


def manifest_for(model: dict, settings: dict, prompts: list[str], seeds: list[int]) -> dict:
    """The manifest of one image folder: the model (file identity or a description), the sampling settings,
    the prompts and seeds; ``key`` hashes all of them."""
    body = {"model": model, "settings": settings, "prompts": prompts, "seeds": seeds}
    return {"version": MANIFEST_VERSION, "key": settings_key(body), **body}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two manifests (for the message when a folder holds other images)."""
    return [k for k in ("model", "settings", "prompts", "seeds") if old.get(k) != new.get(k)]
