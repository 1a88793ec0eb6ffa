"""One regression test per failure the fuzz suite found in the evaluation's host-free readers (reference
statistics, prompt files, the FID Inception network); each failed as its docstring says before the fix. Those behind
ComfyUI (CLIP vision and VAE files) are in test_found_by_fuzzing_evaluation_host.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from distilled_unets.models.students.evaluate import EvaluationError
from distilled_unets.models.students.evaluate.inception import read_reference_stats
from distilled_unets.models.students.evaluate.plan import MAX_PROMPT_CHARS, MAX_PROMPT_FILE, read_prompt_file

from . import _mutate as M
from ._harness import limits, memory_cause


def _refused(fn, match: str) -> EvaluationError:
    """``fn()`` under the harness's limits raises a typed error matching ``match``, not raised from an
    allocation."""
    with limits(), pytest.raises(EvaluationError, match=match) as e:
        fn()
    assert memory_cause(e.value) is None, e.value
    return e.value


def test_statistics_inflating_to_gigabytes_are_refused_from_their_header(tmp_path):
    """Was: numpy allocated the 4.6 GB the archive's sigma inflates to (a MemoryError under the cap, reported as
    'cannot be read'; without it, gigabytes filled before the CRC check failed)."""
    p = tmp_path / "bomb.npz"
    p.write_bytes(M.zip_with_bomb({"mu.npy": M.npy(np.zeros(64))}, "sigma.npy", 24_000))
    e = _refused(lambda: read_reference_stats(str(p), dim=64), r"sigma \(24000, 24000\): not a mean and its covar")
    assert "bomb.npz" in str(e)


@pytest.mark.parametrize("shape", [(2 ** 40,), (2 ** 31, 2 ** 31)])
def test_statistics_claiming_a_huge_shape_are_refused_from_their_header(tmp_path, shape):
    """Was: numpy allocated the claimed shape before reading the data (MemoryError, reported as 'cannot be
    read')."""
    p = tmp_path / "claims.npz"
    p.write_bytes(M.zip_members({"mu.npy": M.npy_claiming(np.zeros(64), shape), "sigma.npy": M.npy(np.eye(64))}))
    _refused(lambda: read_reference_stats(str(p), dim=64), "not a mean and its covariance")


def test_statistics_holding_objects_are_refused_unread(tmp_path):
    """An object array (pickled code) is refused from the .npy header: never handed to the unpickler."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.array([M.RunsCode()], dtype=object), sigma=np.eye(1))
    p = tmp_path / "code.npz"
    p.write_bytes(buf.getvalue())
    _refused(lambda: read_reference_stats(str(p), dim=1), "mu holds object values")


@pytest.mark.parametrize("data,match", [
    ("caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 3"),        # was UnicodeDecodeError
    ("a cat\n".encode("utf-16"), "not UTF-8 text"),                       # was UnicodeDecodeError
    (b"a cat\x00\x00\nb\n", "prompt 1 holds NUL characters"),            # was a prompt holding NULs
    (("x" * (MAX_PROMPT_CHARS + 1)).encode(), "prompt 1 is 10,001 characters long"),  # was a 10 MB prompt for CLIP
    (b"\xef\xbb\xbf\n \n\r\n", "the prompt list is empty"),
])
def test_a_prompt_file_that_is_no_list_of_prompts_is_refused_naming_it(tmp_path, data, match):
    p = tmp_path / "prompts.txt"
    p.write_bytes(data)
    e = _refused(lambda: read_prompt_file(str(p)), match)
    assert "prompts.txt" in str(e)


def test_a_prompt_file_over_the_size_limit_is_refused_unread(tmp_path):
    p = tmp_path / "huge.txt"
    with open(p, "wb") as f:
        f.truncate(MAX_PROMPT_FILE + 1)  # sparse: nothing is written
    _refused(lambda: read_prompt_file(str(p)), "at most 67,108,864")


def test_a_byte_order_mark_and_crlf_are_not_part_of_the_prompts(tmp_path):
    """Was: the first prompt began with U+FEFF (Notepad's UTF-8 files)."""
    p = tmp_path / "prompts.txt"
    p.write_bytes("\ufeffa red cube\r\n\r\n a blue sphere \r\n".encode())
    assert read_prompt_file(str(p)) == ["a red cube", "a blue sphere"]
