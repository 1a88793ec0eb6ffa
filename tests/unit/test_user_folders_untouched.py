"""The check that the suite leaves the user's ComfyUI as it found it (tests/_user_folders.py, run by
tests/conftest.py around the whole session) really notices changes: a fake ComfyUI tree is listed,
changed the ways a test could change it, and listed again."""

from __future__ import annotations

import os

import pytest

from .. import conftest
from .._user_folders import WATCHED, changes, listing, report


@pytest.fixture
def comfy(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "models" / "unet").mkdir(parents=True)
    (root / "models" / "unet" / "put_unet_files_here").write_bytes(b"")
    (root / "models" / "checkpoints").mkdir()
    (root / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"x" * 100)
    (root / "output").mkdir()
    (root / "user" / "default").mkdir(parents=True)
    (root / "user" / "default" / "comfy.settings.json").write_text("{}")
    (root / "input").mkdir()
    return root


def _touch_back(path, seconds=-10):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_unchanged_tree_has_no_changes(comfy):
    before = listing(comfy)
    assert "models/checkpoints/sd15.safetensors" in before and before["temp"] == ("absent", 0, 0)
    assert changes(before, listing(comfy)) == []


def test_a_saved_student_is_reported(comfy):
    """What issue 18 found: a student saved into the user's models/unet/students/."""
    before = listing(comfy)
    (comfy / "models" / "unet" / "students").mkdir()
    (comfy / "models" / "unet" / "students" / "bk-small_00001_.safetensors").write_bytes(b"s" * 64)
    lines = changes(before, listing(comfy))
    assert "added   models/unet/students (dir, 0 bytes)" in lines
    assert "added   models/unet/students/bk-small_00001_.safetensors (file, 64 bytes)" in lines
    assert any(line.startswith("changed models/unet/ ") for line in lines)  # the folder's own mtime


def test_rewritten_removed_and_created_entries_are_reported(comfy):
    before = listing(comfy)
    ckpt = comfy / "models" / "checkpoints" / "sd15.safetensors"
    ckpt.write_bytes(b"y" * 100)  # same size, rewritten
    _touch_back(ckpt, 5)
    (comfy / "user" / "default" / "comfy.settings.json").unlink()
    (comfy / "temp").mkdir()  # a folder that did not exist
    (comfy / "user" / "comfyui.db").write_bytes(b"db")
    lines = changes(before, listing(comfy))
    assert any(line.startswith("changed models/checkpoints/sd15.safetensors (file, 100 -> 100 bytes")
               for line in lines), lines
    assert "removed user/default/comfy.settings.json (file, 2 bytes)" in lines
    assert "added   temp (dir, 0 bytes)" in lines
    assert "added   user/comfyui.db (file, 2 bytes)" in lines


def test_a_file_touched_with_its_time_restored_but_another_size_is_reported(comfy):
    before = listing(comfy)
    ckpt = comfy / "models" / "checkpoints" / "sd15.safetensors"
    st = ckpt.stat()
    ckpt.write_bytes(b"x" * 99)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changes(before, listing(comfy)) == [
        f"changed models/checkpoints/sd15.safetensors (file, 100 -> 99 bytes, mtime {st.st_mtime_ns} -> "
        f"{st.st_mtime_ns})"]


def test_links_are_listed_not_followed(comfy, tmp_path):
    big = tmp_path / "elsewhere"
    big.mkdir()
    (big / "huge.safetensors").write_bytes(b"z")
    (comfy / "models" / "linked").symlink_to(big, target_is_directory=True)
    got = listing(comfy)
    assert got["models/linked"][0] == "link"
    assert not any(k.startswith("models/linked/") for k in got)


def test_report_names_the_comfyui_and_every_change(comfy):
    lines = [f"added   output/img_{i:05}_.png (file, 1 bytes)" for i in range(45)]
    msg = report(comfy, lines)
    assert str(comfy) in msg and all(w in msg for w in WATCHED)
    assert "output/img_00039_.png" in msg and "output/img_00040_.png" not in msg and "... and 5 more" in msg


def test_this_session_watches_the_comfyui_under_test():
    """The session-wide check is armed: the listing of the ComfyUI under test was taken when the session
    started (nothing to watch without one)."""
    if conftest.COMFYUI is None:
        assert conftest._BEFORE is None
    else:
        assert conftest._BEFORE is not None and set(WATCHED) <= set(conftest._BEFORE)
