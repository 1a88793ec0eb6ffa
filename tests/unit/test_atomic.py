"""models/files/atomic.py: a file is either its old content or its new one, never half-written."""

from __future__ import annotations

import json
import os

import pytest
from distilled_unets.models.files import atomic


def test_a_block_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    atomic.write_json(str(path), {"a": 1}, sync=True, sort_keys=True)
    with pytest.raises(RuntimeError):
        with atomic.replacing(str(path)) as f:
            f.write('{"a": ')
            raise RuntimeError("killed half-way")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["run.json"]


def test_the_temporary_name_and_what_a_killed_process_leaves(tmp_path):
    tmp = atomic.partial_path(str(tmp_path / "000001.png"))
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp) == f".000001.png.{os.getpid()}.writing"
    for name in (".000001.png.7.writing", ".run.json.8.writing", "keep.png", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    assert atomic.remove_partial(str(tmp_path)) == [".000001.png.7.writing", ".run.json.8.writing"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", "keep.png"]
    assert atomic.remove_partial(str(tmp_path / "missing")) == []
