"""The user's ComfyUI folders, listed before and after a test session: nothing in the suite may write there.

:func:`listing` records every entry under a ComfyUI's ``models/``, ``output/``, ``user/``, ``input/`` and
``temp/`` (relative name, kind, size, modification time; links are recorded, never followed);
:func:`changes` says, one line each, what differs between two listings. ``tests/conftest.py`` takes the
listing when the session starts and fails the session's last teardown when anything changed.
"""

from __future__ import annotations

import os
from pathlib import Path

WATCHED = ("models", "output", "user", "input", "temp")


def _entry(st: os.stat_result, kind: str) -> tuple:
    return (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)


def listing(comfyui: str | os.PathLike, folders=WATCHED) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns)}`` for each watched folder and everything under it; a folder
    that does not exist is recorded as ``("absent", 0, 0)`` (creating it is a change too)."""
    root = Path(comfyui)
    out: dict[str, tuple] = {}
    for name in folders:
        top = root / name
        if not top.is_dir():
            out[name] = ("absent", 0, 0)
            continue
        out[name] = _entry(top.lstat(), "dir")
        for base, dirs, files in os.walk(top):  # links are listed, not followed
            for n in dirs + files:
                p = os.path.join(base, n)
                try:
                    st = os.lstat(p)
                except OSError:  # removed while we looked
                    continue
                kind = "link" if os.path.islink(p) else "dir" if os.path.isdir(p) else "file"
                out[os.path.relpath(p, root).replace(os.sep, "/")] = _entry(st, kind)
    return out


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """One line per difference: ``added``, ``removed`` or ``changed`` with the old and new kind/size/time."""
    out = []
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        if a is None or a[0] == "absent":
            out.append(f"added   {name} ({b[0]}, {b[1]} bytes)")
        elif b is None or b[0] == "absent":
            out.append(f"removed {name} ({a[0]}, {a[1]} bytes)")
        elif a[0] == "dir" and b[0] == "dir":
            out.append(f"changed {name}/ (its entries were modified, mtime {a[2]} -> {b[2]})")
        else:
            out.append(f"changed {name} ({a[0]}, {a[1]} -> {b[1]} bytes, mtime {a[2]} -> {b[2]})")
    return out


def report(comfyui: str | os.PathLike, lines: list[str], limit: int = 40) -> str:
    """The failure message for a session that changed ``comfyui``'s folders."""
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return (f"the test session changed the ComfyUI installation's own folders at {comfyui} "
            f"({', '.join(WATCHED)}); tests and tools must write only to folders of their own:\n  "
            + "\n  ".join(shown))
