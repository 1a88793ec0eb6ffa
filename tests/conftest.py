"""Test setup: the pack imported as ``distilled_unets`` and a real ComfyUI for the host tests, both
through ``tools/_host.py`` (the one place that finds ComfyUI and imports the pack; ``tools/`` is on the
path through pytest's ``pythonpath`` setting in pyproject.toml).

ComfyUI is ``COMFYUI_PATH``, the ComfyUI whose custom_nodes/ holds this checkout, or ~/ComfyUI. Host
tests (tests/comfy/, or marked ``host``) skip with one line when there is none.

The suite leaves that ComfyUI as it found it: its ``models/``, ``output/``, ``user/``, ``input/`` and
``temp/`` are listed when the session starts and compared when it ends (``tests/_user_folders.py``; a
difference fails the session's last teardown, naming every entry). In this process, ComfyUI's
``folder_paths`` writes to a temporary folder of the session (output, temp, user and input folders,
and first in the model folders savers write to), restored and removed at the end; the servers get
folders of their own (``tools/comfy_server.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from _host import REPO, comfyui_version, find_comfyui, import_pack, missing_reason, setup_comfy
from comfy_server import WRITTEN_MODEL_FOLDERS  # the model folders whose first path savers write to

from ._user_folders import changes, listing, report

ROOT = REPO
import_pack()

COMFYUI = find_comfyui()
_HOST_ERROR: str | None = None
_BEFORE: dict | None = None  # the listing of COMFYUI's folders when the session started
_PRIVATE: tuple | None = None  # (temporary folder, what folder_paths held before) while redirected


def _private_comfyui_folders() -> None:
    """Point this process's ComfyUI ``folder_paths`` at a temporary folder for everything it writes."""
    global _PRIVATE
    import folder_paths as fp

    root = Path(tempfile.mkdtemp(prefix="distilled-unets-comfyui-"))
    saved_dirs = (fp.get_output_directory(), fp.get_temp_directory(), fp.get_user_directory(),
                  fp.get_input_directory())
    saved_models = {k: (list(fp.folder_names_and_paths[k][0]), fp.folder_names_and_paths[k][1])
                    for k in WRITTEN_MODEL_FOLDERS if k in fp.folder_names_and_paths}
    for name, setter in (("output", fp.set_output_directory), ("temp", fp.set_temp_directory),
                         ("user", fp.set_user_directory), ("input", fp.set_input_directory)):
        (root / name).mkdir()
        setter(str(root / name))
    for k in WRITTEN_MODEL_FOLDERS:
        (root / "models" / k).mkdir(parents=True)
        fp.add_model_folder_path(k, str(root / "models" / k), is_default=True)
    fp.filename_list_cache.clear()
    _PRIVATE = (root, saved_dirs, saved_models)


def _restore_comfyui_folders() -> None:
    global _PRIVATE
    if _PRIVATE is None:
        return
    import folder_paths as fp

    root, (output, temp, user, input_), saved_models = _PRIVATE
    fp.set_output_directory(output)
    fp.set_temp_directory(temp)
    fp.set_user_directory(user)
    fp.set_input_directory(input_)
    for k in WRITTEN_MODEL_FOLDERS:
        if k in saved_models:
            fp.folder_names_and_paths[k] = (saved_models[k][0], saved_models[k][1])
        else:
            fp.folder_names_and_paths.pop(k, None)
    fp.filename_list_cache.clear()
    shutil.rmtree(root, ignore_errors=True)
    _PRIVATE = None


def _setup_host() -> str | None:
    """Put ComfyUI on sys.path in CPU mode, writing to private folders. Returns a reason string when it
    cannot be used."""
    if COMFYUI is None:
        return missing_reason()
    try:
        setup_comfy(COMFYUI)
        import comfy.model_management  # noqa: F401
        import comfy_api.latest  # noqa: F401
        _private_comfyui_folders()
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"ComfyUI at {COMFYUI} does not import: {type(e).__name__}: {e}"
    return None


def pytest_addoption(parser):
    group = parser.getgroup("fuzz", "the fuzz suite (tests/fuzz, docs/fuzzing.md)")
    group.addoption("--fuzz-cases", type=int, default=None,
                    help="inputs per reader (default: DISTILLED_UNETS_FUZZ_CASES, else the CI count in tests/fuzz)")
    group.addoption("--fuzz-seed", type=int, default=None,
                    help="Hypothesis seed of every reader's cases (default: DISTILLED_UNETS_FUZZ_SEED, else 0)")
    group.addoption("--fuzz-report", default=None, help="write the per-reader counts as JSON to this file")


def pytest_sessionstart(session):
    global _BEFORE
    if COMFYUI is not None:
        _BEFORE = listing(COMFYUI)


def pytest_sessionfinish(session, exitstatus):
    _restore_comfyui_folders()


@pytest.fixture(scope="session", autouse=True)
def _comfyui_folders_untouched():
    """Set up before, torn down after every other fixture: fails the session's last teardown when the suite
    changed anything in the ComfyUI installation's own folders."""
    yield
    if _BEFORE is not None:
        lines = changes(_BEFORE, listing(COMFYUI))
        if lines:
            pytest.fail(report(COMFYUI, lines), pytrace=False)


def pytest_report_header(config):
    return f"ComfyUI: {comfyui_version(COMFYUI)} at {COMFYUI}" if COMFYUI else f"ComfyUI: {missing_reason()}"


def pytest_collection_modifyitems(config, items):
    global _HOST_ERROR
    host_items = [it for it in items if "tests/comfy" in str(it.fspath).replace(os.sep, "/")
                  or it.get_closest_marker("host")]
    if not host_items:
        return
    _HOST_ERROR = _setup_host()
    for it in host_items:
        it.add_marker(pytest.mark.host)
        if _HOST_ERROR:
            it.add_marker(pytest.mark.skip(reason=_HOST_ERROR))


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    if COMFYUI is None or _HOST_ERROR:
        pytest.skip(_HOST_ERROR or missing_reason())
    return COMFYUI
