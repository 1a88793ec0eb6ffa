"""Mutations of the files the pack reads, drawn through Hypothesis (``draw`` is ``st.data().draw``).

Each mutation takes the bytes of a valid file and returns ``(new bytes, label)``; the label names the mutation
family (for the per-reader counts) and the draw is what Hypothesis prints for a failing case, so every input is
reproducible from the seed. Families, by file kind:

* any file: truncation at any byte, flipped bits anywhere;
* safetensors: flipped bits in the header and in the data, headers whose dtypes, shapes or offsets lie (offsets
  past the end, overlapping, reversed; shapes with negative, huge, overflowing or non-integer dims; dtypes
  renamed or unknown), entries and ``__metadata__`` of the wrong type, a lying header-length prefix, renamed,
  missing and duplicated keys, metadata values replaced by JSON of the wrong type;
* JSON (config.json, metadata.json, index files): wrong types at any place, absurd numbers, keys removed, the
  whole document replaced by a list or a number, cut off;
* torch pickles (``torch.save`` files): the generic ones, plus a pickle that would run code (it creates the
  sentinel file the harness checks for) in each form torch can read: zip, legacy and plain pickle.

Structure-aware mutations that only one reader knows (shards of the wrong structure, a checkpoint's metadata
fields) live with the reader (``_readers.py``) and use the value strategies here.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable

from hypothesis import strategies as st

Draw = Callable
Mutation = Callable[[Draw, bytes], tuple[bytes, str]]

#: the file a pickle that runs code creates (the harness fails any case after which it exists)
SENTINEL = os.path.join(tempfile.gettempdir(), f"distilled-unets-fuzz-code-ran-{os.getpid()}")
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]

#: JSON values of every type, small (what a hand-edited or corrupted document holds where it should not)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6)
#: sizes that break allocators and arithmetic: negative, zero, huge, beyond 64 bits, not integers
absurd_ints = st.sampled_from([-1, 0, 2 ** 31, 2 ** 40, 2 ** 62, 2 ** 63, 2 ** 64 + 1, 10 ** 30]) | st.integers()
not_ints = st.sampled_from([1.5, "4", None, True, [4], {"n": 4}, float("nan")])


# ------------------------------------------------------------------------------------------------
# any file


def truncate(draw: Draw, data: bytes) -> tuple[bytes, str]:
    return data[:draw(st.integers(0, max(0, len(data) - 1)), label="truncate at")], "truncated"


def flip_bits(draw: Draw, data: bytes, lo: int = 0, hi: int | None = None, label: str = "bit flips") -> \
        tuple[bytes, str]:
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data, label
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8), label="bits")):
        pos = draw(st.integers(lo, hi - 1), label="byte")
        out[pos] ^= 1 << draw(st.integers(0, 7), label="bit")
    return bytes(out), label


def any_file(draw: Draw, data: bytes) -> tuple[bytes, str]:
    return (truncate if draw(st.booleans(), label="truncate") else flip_bits)(draw, data)


# ------------------------------------------------------------------------------------------------
# safetensors


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes, *, pad: bool = True) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def sparse_safetensors(path, shapes: dict, dtype: str = "F16"):
    """A safetensors file of zero tensors of ``shapes``: the header, then a hole up to the size it declares (as
    large as the real file, written and read back as zeros in no time: a full-size network for a loader to read)."""
    import math

    size = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header, at = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape) * size
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + at)
    return path


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def header_lie(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """One field of one tensor's header entry (or the header itself) made to lie; the data stay."""
    header, body = split_safetensors(data)
    names = _tensor_names(header)
    if not names:
        return data, "header lies: none"
    name = draw(st.sampled_from(names), label="tensor")
    entry = dict(header[name])
    what = draw(st.sampled_from([
        "dtype", "dtype-unknown", "dtype-type", "shape-dim", "shape-extra", "shape-drop", "shape-type",
        "shape-huge", "offsets-past-end", "offsets-overlap", "offsets-reversed", "offsets-type", "offsets-len",
        "entry-type", "entry-missing", "metadata-type", "length-prefix"]), label="lie")
    shape, (a, b) = list(entry["shape"]), entry["data_offsets"]
    if what == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES), label="dtype")
    elif what == "dtype-unknown":
        entry["dtype"] = draw(st.sampled_from(["F128", "C64", "", "f32", "float32", "Q4_K"]), label="dtype")
    elif what == "dtype-type":
        entry["dtype"] = draw(json_values.filter(lambda v: not isinstance(v, str)), label="dtype")
    elif what == "shape-dim" and shape:
        shape[draw(st.integers(0, len(shape) - 1), label="dim")] = draw(absurd_ints, label="size")
        entry["shape"] = shape
    elif what == "shape-extra":
        entry["shape"] = shape + [draw(absurd_ints, label="size")]
    elif what == "shape-drop" and shape:
        entry["shape"] = shape[:-1]
    elif what == "shape-type":
        if shape and draw(st.booleans(), label="in a dim"):
            shape[draw(st.integers(0, len(shape) - 1), label="dim")] = draw(not_ints, label="size")
            entry["shape"] = shape
        else:
            entry["shape"] = draw(json_values.filter(lambda v: not isinstance(v, list)), label="shape")
    elif what == "shape-huge":  # a consistent-looking claim of terabytes (the product overflows 64 bits or not)
        entry["shape"] = [draw(st.sampled_from([2 ** 20, 2 ** 32, 2 ** 40, 2 ** 63 - 1]), label="size")] * \
            draw(st.integers(1, 4), label="dims")
        entry["data_offsets"] = [a, a + draw(st.sampled_from([2 ** 40, 2 ** 64, b - a]), label="claimed bytes")]
    elif what == "offsets-past-end":
        entry["data_offsets"] = [a, len(body) + draw(st.integers(1, 2 ** 40), label="past the end")]
    elif what == "offsets-overlap":
        other = header[draw(st.sampled_from(names), label="other")]["data_offsets"]
        entry["data_offsets"] = [other[0], other[0] + (b - a)]
    elif what == "offsets-reversed":
        entry["data_offsets"] = [b, a]
    elif what == "offsets-type":
        entry["data_offsets"] = [draw(not_ints, label="start"), b]
    elif what == "offsets-len":
        entry["data_offsets"] = draw(st.sampled_from([[a], [a, b, b], [], None, "0-4"]), label="offsets")
    elif what == "entry-type":
        header[name] = draw(json_values.filter(lambda v: not isinstance(v, dict)), label="entry")
        return join_safetensors(header, body), f"header lies: {what}"
    elif what == "entry-missing":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field"))
    elif what == "metadata-type":
        header["__metadata__"] = draw(json_values.filter(lambda v: not isinstance(v, dict)) | st.dictionaries(
            st.text(max_size=8), json_values.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3),
            label="metadata")
        return join_safetensors(header, body), f"header lies: {what}"
    elif what == "length-prefix":
        out = bytearray(data)
        (n,) = struct.unpack("<Q", data[:8])
        out[:8] = struct.pack("<Q", max(0, min(2 ** 64 - 1, n + draw(
            st.sampled_from([-8, -1, 1, 8, 2 ** 20, 2 ** 62]), label="length change"))))
        return bytes(out), f"header lies: {what}"
    header[name] = entry
    return join_safetensors(header, body), f"header lies: {what}"


def _rename(draw: Draw, key: str) -> str:
    how = draw(st.sampled_from(["bit", "suffix", "prefix", "segment"]), label="rename")
    if how == "bit":
        i = draw(st.integers(0, len(key) - 1), label="char")
        c = chr((ord(key[i]) ^ (1 << draw(st.integers(0, 6), label="bit"))) or 1)
        return key[:i] + c + key[i + 1:]
    if how == "suffix":
        return key.rsplit(".", 1)[0] + "." + draw(st.sampled_from(["weight", "bias", "lora_up.weight", "alpha",
                                                                    "routing_weight", "x"]), label="suffix")
    if how == "prefix":
        return draw(st.sampled_from(["", "model.", "unet.", "diffusion_model.", "x."]), label="prefix") + \
            key.split(".", 1)[-1]
    parts = key.split(".")
    i = draw(st.integers(0, len(parts) - 1), label="segment")
    parts[i] = draw(st.sampled_from(["0", "1", "7", "99", "down_blocks", "input_blocks", "attentions", ""]),
                    label="to")
    return ".".join(parts)


def keys(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """Renamed, missing or duplicated tensors (the header stays consistent with the data)."""
    header, body = split_safetensors(data)
    names = _tensor_names(header)
    if not names:
        return data, "keys: none"
    what = draw(st.sampled_from(["rename", "drop", "drop-many", "duplicate"]), label="keys")
    if what == "rename":
        for _ in range(draw(st.integers(1, 3), label="renames")):
            name = draw(st.sampled_from(names), label="key")
            if name in header:
                header[_rename(draw, name)] = header.pop(name)
    elif what == "drop":
        header.pop(draw(st.sampled_from(names), label="key"))
    elif what == "drop-many":  # a block gone: every key under one prefix
        name = draw(st.sampled_from(names), label="key")
        cut = draw(st.integers(1, max(1, name.count("."))), label="prefix parts")
        prefix = ".".join(name.split(".")[:cut])
        for k in names:
            if k.startswith(prefix):
                header.pop(k)
    else:
        name = draw(st.sampled_from(names), label="key")
        header[_rename(draw, name)] = dict(header[name])  # overlapping offsets, consistent shape
        return join_safetensors(header, body), "keys: duplicate"
    return _repack(header, body), f"keys: {what}"


def _repack(header: dict, body: bytes) -> bytes:
    """A whole, valid safetensors file of the tensors left in ``header`` (their data moved up, no holes)."""
    out, new_body, at = {}, bytearray(), 0
    for name, entry in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                              key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = entry["data_offsets"]
        new_body += body[a:b]
        out[name] = dict(entry, data_offsets=[at, at + (b - a)])
        at += b - a
    if "__metadata__" in header:
        out["__metadata__"] = header["__metadata__"]
    return join_safetensors(out, bytes(new_body))


def metadata(draw: Draw, data: bytes, fields: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """A metadata value replaced: by JSON of the wrong type, by a JSON document edited inside, or cut off."""
    header, body = split_safetensors(data)
    meta = dict(header.get("__metadata__") or {})
    names = sorted(set(meta) | set(fields)) or ["format"]
    key = draw(st.sampled_from(names), label="metadata key")
    old = meta.get(key, "")
    how = draw(st.sampled_from(["json-of-wrong-type", "edit-inside", "cut", "drop", "garbage"]), label="how")
    if how == "json-of-wrong-type":
        meta[key] = json.dumps(draw(json_values, label="value"))
    elif how == "edit-inside":
        try:
            doc = json.loads(old)
        except ValueError:
            doc = None
        meta[key] = json.dumps(edit_json(draw, doc)) if doc is not None else json.dumps(draw(json_values))
    elif how == "cut":
        meta[key] = old[:draw(st.integers(0, max(0, len(old) - 1)), label="cut at")]
    elif how == "drop":
        meta.pop(key, None)
    else:
        meta[key] = draw(st.text(max_size=20), label="garbage")
    header["__metadata__"] = meta
    return join_safetensors(header, body), f"metadata: {how}"


def safetensors_file(fields: tuple[str, ...] = ()) -> Mutation:
    """Every safetensors mutation; ``fields``: metadata keys worth editing even when the file lacks them."""
    def mutate(draw: Draw, data: bytes) -> tuple[bytes, str]:
        (n,) = struct.unpack("<Q", data[:8])
        what = draw(st.sampled_from(["truncate", "flip-header", "flip-data", "header-lie", "keys", "metadata"]),
                    label="mutation")
        if what == "truncate":
            return truncate(draw, data)
        if what == "flip-header":
            return flip_bits(draw, data, 0, 8 + n, "bit flips in the header")
        if what == "flip-data":
            return flip_bits(draw, data, 8 + n, len(data), "bit flips in the data")
        if what == "header-lie":
            return header_lie(draw, data)
        if what == "keys":
            return keys(draw, data)
        return metadata(draw, data, fields)
    return mutate


# ------------------------------------------------------------------------------------------------
# JSON documents


def _paths(doc, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def edit_json(draw: Draw, doc):
    """``doc`` with one place changed: a wrong type, an absurd number, a number as a string, a key removed."""
    paths = _paths(doc)
    path = draw(st.sampled_from(paths), label="at")
    how = draw(st.sampled_from(["wrong-type", "absurd-number", "as-string", "remove"]), label="edit")
    if not path:
        return draw(json_values, label="document") if how != "remove" else None
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    old = parent[path[-1]]
    if how == "remove":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    elif how == "absurd-number":
        parent[path[-1]] = draw(absurd_ints | st.sampled_from([1e308, -1e308, float("nan"), float("inf")]),
                                label="number")
    elif how == "as-string":
        parent[path[-1]] = json.dumps(old)
    else:
        parent[path[-1]] = draw(json_values, label="value")
    return doc


def json_file(draw: Draw, data: bytes) -> tuple[bytes, str]:
    what = draw(st.sampled_from(["edit", "edit", "edit", "root", "truncate", "flip"]), label="json mutation")
    if what == "truncate":
        return truncate(draw, data)
    if what == "flip":
        return flip_bits(draw, data)
    if what == "root":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)), label="root")).encode(), \
            "json: root of the wrong type"
    try:
        doc = json.loads(data)
    except ValueError:
        return data, "json: unreadable already"
    return json.dumps(edit_json(draw, doc)).encode(), "json: edited"


# ------------------------------------------------------------------------------------------------
# torch pickles


class RunsCode:
    """Unpickling this runs code: it creates :data:`SENTINEL`."""

    def __reduce__(self):
        return exec, (f"open({SENTINEL!r}, 'w').close()",)


def code_pickle(draw: Draw, value_with_code, form: str | None = None) -> tuple[bytes, str]:
    """``value_with_code`` written as torch can read it: zip (torch.save), legacy torch.save, or plain pickle."""
    import pickle

    import torch

    form = form or draw(st.sampled_from(["zip", "legacy", "pickle"]), label="pickle form")
    buf = io.BytesIO()
    if form == "pickle":
        pickle.dump(value_with_code, buf)
    else:
        torch.save(value_with_code, buf, _use_new_zipfile_serialization=form == "zip")
    return buf.getvalue(), f"pickle that runs code ({form})"


def torch_file(with_code: object) -> Mutation:
    """Mutations of a torch.save file: cut, flipped bits, or replaced by ``with_code`` (the reader's structure
    with a :class:`RunsCode` inside) pickled in each form torch reads."""
    def mutate(draw: Draw, data: bytes) -> tuple[bytes, str]:
        what = draw(st.sampled_from(["truncate", "flip", "flip", "code"]), label="mutation")
        if what == "truncate":
            return truncate(draw, data)
        if what == "flip":
            return flip_bits(draw, data)
        return code_pickle(draw, with_code)
    return mutate


# ------------------------------------------------------------------------------------------------
# numpy .npz archives (reference statistics)


def npy(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=True)
    return buf.getvalue()


def npy_claiming(array, shape: tuple) -> bytes:
    """An ``.npy`` member whose header declares ``shape`` while its data stay those of ``array``."""
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + np.ascontiguousarray(array).tobytes()


def zip_members(members: dict[str, bytes], compressed: bool = False) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def _deflated_zero_npy(side: int) -> tuple[bytes, int]:
    """(raw deflate stream, inflated size) of an ``.npy`` of ``side x side`` float64 zeros: a few megabytes that
    inflate to ``8 side^2`` bytes, made by repeating one fully flushed deflate block of a MiB of zeros."""
    import zlib

    import numpy as np

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": (side, side)})
    mib = b"\0" * (1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(mib)
    block = c.flush(zlib.Z_FULL_FLUSH)  # after a full flush the window is empty: each such block stands alone
    total = 8 * side * side
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = (_full_flush(head.getvalue()) + block * (total // len(mib))
            + tail.compress(b"\0" * (total % len(mib))) + tail.flush())
    return body, len(head.getvalue()) + total


def _full_flush(data: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


def zip_with_bomb(members: dict[str, bytes], bomb: str, side: int) -> bytes:
    """A zip archive (written by hand: zipfile would inflate to write it) of ``members`` stored, and ``bomb``: an
    ``.npy`` of ``side x side`` zeros deflated (see :func:`_deflated_zero_npy`), its sizes in a ZIP64 field. Its
    CRC is left 0: a reader that inflates it fails the check only after filling that much memory."""
    out, central = bytearray(), bytearray()
    for name, data in members.items():
        n, crc = name.encode(), zlib_crc(data)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(n),
                               0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(n), 0) + n + data
    body, size = _deflated_zero_npy(side)
    n = bomb.encode()
    local_extra = struct.pack("<HHQQ", 1, 16, size, len(body))
    central_extra = struct.pack("<HHQQQ", 1, 24, size, len(body), len(out))
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(n),
                           len(central_extra), 0, 0, 0, 0, 0xFFFFFFFF) + n + central_extra
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(n),
                       len(local_extra)) + n + local_extra + body
    count, at = len(members) + 1, len(out)
    out += central
    end64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), at)
    out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), 0xFFFFFFFF, 0)
    return bytes(out)


def zlib_crc(data: bytes) -> int:
    import zlib

    return zlib.crc32(data) & 0xFFFFFFFF


def npz_file(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """Cut, flipped bits, or one array replaced: another dtype or shape, NaN, strings, an object array that
    runs code when unpickled (``np.load`` must be called with ``allow_pickle=False``), renamed; an ``.npy`` header
    that claims a huge shape (a reader that trusts it allocates that much before reading); an array that inflates
    to gigabytes from a few megabytes of deflated zeros; something that is not a zip archive at all."""
    import numpy as np

    what = draw(st.sampled_from(["truncate", "flip", "array", "array", "array", "claim", "bomb", "not-zip"]),
                label="mutation")
    if what == "truncate":
        return truncate(draw, data)
    if what == "flip":
        return flip_bits(draw, data)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if what == "not-zip":
        kind = draw(st.sampled_from(["npy", "pickle", "text", "empty"]), label="instead")
        if kind == "npy":
            return npy(arrays[sorted(arrays)[0]]), "npz: a plain .npy"
        if kind == "pickle":
            import pickle

            return pickle.dumps({"mu": RunsCode(), "sigma": RunsCode()}), "npz: a pickle that runs code"
        return (b"mu 0 0 0\nsigma 1 0 0\n" if kind == "text" else b""), f"npz: {kind}"
    name = draw(st.sampled_from(sorted(arrays) + ["extra"]), label="array")
    old = arrays.get(name, np.zeros(3))
    members = {f"{k}.npy": npy(v) for k, v in arrays.items()}
    if what == "claim":
        shape = draw(st.sampled_from([(2 ** 40,), (2 ** 31, 2 ** 31), (2 ** 62,), (1 << 20, 1 << 20), (0,), (2 ** 17,),
                                      tuple(old.shape) + (2 ** 20,)]), label="claimed shape")
        members[f"{name}.npy"] = npy_claiming(old, shape)
        return zip_members(members), "npz: a header claiming a huge shape"
    if what == "bomb":  # 4.6 / 8.6 GB once inflated: beyond the harness's cap
        members.pop(f"{name}.npy", None)
        return zip_with_bomb(members, f"{name}.npy", draw(st.sampled_from([24_000, 32_768]), label="side")), \
            "npz: an array inflating to gigabytes"
    how = draw(st.sampled_from(["dtype", "shape", "nan", "strings", "code", "drop", "rename"]), label="how")
    if how == "dtype":
        arrays[name] = old.astype(draw(st.sampled_from(["int8", "float16", "bool", "complex64", "uint64", ">f8"]),
                                       label="dtype"))
    elif how == "shape":
        arrays[name] = draw(st.sampled_from([old.reshape(-1)[: max(0, old.size - 1)], np.zeros((2,) * 5),
                                             np.float64(1.0), old.reshape(-1)[:, None], np.zeros((0, 0))]),
                            label="shape")
    elif how == "nan":
        arrays[name] = np.full(old.shape, draw(st.sampled_from([np.nan, np.inf, -np.inf])),
                               dtype=old.dtype if old.dtype.kind == "f" else np.float64)
    elif how == "strings":
        arrays[name] = np.array(["a", "b"])
    elif how == "code":
        arrays[name] = np.array([RunsCode()], dtype=object)
    elif how == "rename":
        arrays[draw(st.sampled_from(["mean", "cov", "MU", "mu ", "sigma.npy", "arr_0", ""]), label="to")] = \
            arrays.pop(name, old)
    else:
        arrays.pop(name, None)
    buf = io.BytesIO()
    if any(a.dtype.hasobject for a in arrays.values()):
        np.savez(buf, allow_pickle=True, **arrays) if _savez_takes_allow_pickle() else np.savez(buf, **arrays)
    else:
        np.savez(buf, **arrays)
    return buf.getvalue(), f"npz: {how}"


def _savez_takes_allow_pickle() -> bool:
    import inspect

    import numpy as np

    return "allow_pickle" in inspect.signature(np.savez).parameters


# ------------------------------------------------------------------------------------------------
# text files (a prompt list)


def text_file(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """Cut, flipped bits, or a text file gone wrong: binary garbage, a huge line, empty, only blank lines,
    invalid UTF-8, NUL bytes, UTF-16, a byte-order mark, other line endings, control characters, many lines."""
    what = draw(st.sampled_from(["truncate", "flip", "binary", "huge-line", "empty", "blank", "invalid-utf8", "nul",
                                 "utf16", "bom", "line-endings", "control", "many-lines", "unicode"]),
                label="mutation")
    if what == "truncate":
        return truncate(draw, data)
    if what == "flip":
        return flip_bits(draw, data)
    if what == "binary":
        return draw(st.binary(min_size=1, max_size=4096), label="bytes"), "text: binary garbage"
    if what == "huge-line":
        n = draw(st.sampled_from([9_999, 10_000, 10_001, 100_000, 4_000_000]), label="characters")
        line = (draw(st.sampled_from(["a", "a photo ", "\u00e9", "\u6f22", " "]), label="text") * n)[:n]
        return data + line.encode() + b"\n", "text: a huge line"
    if what == "empty":
        return b"", "text: empty"
    if what == "blank":
        return draw(st.sampled_from([b"\n", b"\n\n\n", b" \t \n  \n", b"\r\n\r\n", b"\xc2\xa0\n", b"\x0b\x0c\n",
                                     b"\xef\xbb\xbf\n \n"]), label="blank"), "text: blank lines only"
    if what == "invalid-utf8":
        at = draw(st.integers(0, len(data)), label="at")
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                    b"caf\xe9"]), label="bytes")
        return data[:at] + bad + data[at:], "text: invalid UTF-8"
    if what == "nul":
        at = draw(st.integers(0, len(data)), label="at")
        return data[:at] + b"\0" * draw(st.integers(1, 4), label="nuls") + data[at:], "text: NUL bytes"
    if what == "utf16":
        return data.decode("utf-8", "replace").encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"]),
                                                           label="encoding")), "text: UTF-16/32"
    if what == "bom":
        return b"\xef\xbb\xbf" + data, "text: byte-order mark"
    if what == "line-endings":
        return data.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r", "\u2028".encode(),
                                                          b"\x85"]), label="ending")), "text: line endings"
    if what == "control":
        at = draw(st.integers(0, len(data)), label="at")
        return data[:at] + draw(st.sampled_from([b"\x1b[31m", b"\x07", b"\x7f", b"\t\t", b"\x1a"]),
                                label="control") + data[at:], "text: control characters"
    if what == "many-lines":
        return data * draw(st.sampled_from([100, 10_000]), label="copies"), "text: many lines"
    return draw(st.text(min_size=0, max_size=200), label="text").encode("utf-8", "surrogatepass"), \
        "text: any unicode"
