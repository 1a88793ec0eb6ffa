"""Find ComfyUI and import this pack: the one place tests, tools, benches and ``.ci/run`` do it.

Standard library only at import time (``.ci/run`` runs it with any ``python3`` before a venv exists).

* :func:`find_comfyui` - one ComfyUI: the folder given, else ``COMFYUI_PATH``, else the ComfyUI whose
  ``custom_nodes/`` holds this checkout, else ``~/ComfyUI``. A folder given or named by ``COMFYUI_PATH``
  is the only candidate (a wrong path is reported, never silently replaced by another ComfyUI).
* :func:`all_comfyuis` - every ComfyUI to test against: ``COMFYUI_PATHS`` (colon-separated), else the
  usual places above plus ``~/ComfyUI-0.33``.
* :func:`import_pack` - the pack imported under its fixed name ``distilled_unets`` whatever its folder
  is called, so its relative imports work as they do inside ComfyUI.
* :func:`setup_comfy` - ComfyUI on ``sys.path`` with its command-line arguments set for an in-process
  host (CPU unless told otherwise, no other custom nodes).

``python3 tools/_host.py --all`` prints ``<version>\\t<path>`` for every ComfyUI found (used by ``.ci/run``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "distilled_unets"
USUAL_EXTRA = ("ComfyUI-0.33",)  # more usual places for the test matrix, under the home folder


class HostError(RuntimeError):
    """No usable ComfyUI; the message says where it looked and what to set."""


def is_comfyui(path: str | os.PathLike) -> bool:
    return (Path(path) / "comfy" / "model_patcher.py").is_file()


def _usual_places() -> list[Path]:
    places = []
    if REPO.parent.name == "custom_nodes":
        places.append(REPO.parent.parent)
    places.append(Path.home() / "ComfyUI")
    return places


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ComfyUI to use (see the module docstring for the order), resolved; None when there is none."""
    given = explicit or os.environ.get("COMFYUI_PATH")
    candidates = [Path(given).expanduser()] if given else _usual_places()
    for c in candidates:
        if is_comfyui(c):
            return c.resolve()
    return None


def missing_reason(explicit: str | os.PathLike | None = None) -> str:
    """One line saying why :func:`find_comfyui` found nothing (for skips and errors)."""
    given = explicit or os.environ.get("COMFYUI_PATH")
    if given:
        return f"no ComfyUI at {given} (no comfy/model_patcher.py there)"
    return "no ComfyUI found (set COMFYUI_PATH, or put ComfyUI at ~/ComfyUI)"


def all_comfyuis() -> list[Path]:
    """Every ComfyUI to test against, in order, without duplicates. ``COMFYUI_PATHS`` (colon-separated)
    wins, else ``COMFYUI_PATH`` and the usual places. A path named in either variable that is not a
    ComfyUI raises :class:`HostError` (a typo must not shrink the matrix)."""
    listed = os.environ.get("COMFYUI_PATHS")
    if listed:
        paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p.strip()]
        bad = [str(p) for p in paths if not is_comfyui(p)]
        if bad:
            raise HostError(f"COMFYUI_PATHS names folders without comfy/model_patcher.py: {', '.join(bad)}")
    else:
        first = os.environ.get("COMFYUI_PATH")
        if first and not is_comfyui(Path(first).expanduser()):
            raise HostError(missing_reason())
        paths = ([Path(first).expanduser()] if first else []) + _usual_places() \
            + [Path.home() / name for name in USUAL_EXTRA]
        paths = [p for p in paths if is_comfyui(p)]
    out = []
    for p in paths:
        p = p.resolve()
        if p not in out:
            out.append(p)
    return out


def comfyui_version(comfyui: str | os.PathLike) -> str:
    """ComfyUI's version as its ``comfyui_version.py`` (or ``pyproject.toml``) states it, read as text."""
    for name in ("comfyui_version.py", "pyproject.toml"):
        f = Path(comfyui) / name
        if f.is_file():
            m = re.search(r'^(?:__version__|version)\s*=\s*["\']([^"\']+)["\']', f.read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
    return "unknown"


def import_pack():
    """The pack module, registered as ``distilled_unets`` (imported once; later calls return it)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[PACK]
            raise
    return sys.modules[PACK]


def setup_comfy(explicit: str | os.PathLike | None = None, *, cpu: bool = True, append: bool = False) -> Path:
    """Put ComfyUI on ``sys.path`` (first, or last with ``append``) and set its arguments for running in
    this process: ``--cpu`` when ``cpu``, no other custom nodes. Returns its folder; raises HostError."""
    comfyui = find_comfyui(explicit)
    if comfyui is None:
        raise HostError(missing_reason(explicit))
    if str(comfyui) not in sys.path:
        if append:
            sys.path.append(str(comfyui))
        else:
            sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = True
    return comfyui


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="List the ComfyUI installs the tests would use.")
    ap.add_argument("--all", action="store_true", help="every ComfyUI for the test matrix (COMFYUI_PATHS, else "
                                                      "the usual places), one '<version>\\t<path>' a line")
    args = ap.parse_args(argv)
    try:
        found = all_comfyuis() if args.all else [c for c in [find_comfyui()] if c]
    except HostError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for c in found:
        sys.stdout.write(f"{comfyui_version(c)}\t{c}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
