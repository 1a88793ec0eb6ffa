"""Files that are never seen half-written: each is written under a temporary name in its own folder
(``.<name>.<pid>.writing``), then renamed over its name; a killed process leaves only such temporary files,
which :func:`remove_partial` clears."""

from __future__ import annotations

import contextlib
import json
import os

SUFFIX = ".writing"


def partial_path(path: str) -> str:
    """The temporary name ``path`` is written under: ``.<name>.<pid>.writing`` in the same folder."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}{SUFFIX}")


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", *, sync: bool = False, **open_kw):
    """An open file that becomes ``path`` when the block ends (renamed over it; flushed to the disk first when
    ``sync``); if the block raises, the temporary file is removed and ``path`` is as it was."""
    tmp = partial_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data, *, sync: bool = False, **dump_kw) -> None:
    """``data`` as JSON at ``path`` (UTF-8), never half-written; ``dump_kw`` go to ``json.dump``."""
    with replacing(path, "w", sync=sync, encoding="utf-8") as f:
        json.dump(data, f, **dump_kw)


def remove_partial(folder: str) -> list[str]:
    """Remove the temporary files a killed process left in ``folder`` (``.<name>.<pid>.writing``); returns their
    names, sorted."""
    gone = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.startswith(".") and f.endswith(SUFFIX):
            try:
                os.remove(os.path.join(folder, f))
                gone.append(f)
            except OSError:
                pass
    return gone
