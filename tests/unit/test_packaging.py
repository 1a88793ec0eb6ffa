"""What the Comfy Registry shows: the icon the listing points at is a file of this repository."""

from __future__ import annotations

from pathlib import Path

import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_icon_exists_and_fits_the_registry_spec():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    url = meta["tool"]["comfy"]["Icon"]
    path = ROOT / url.split("/main/", 1)[1]
    assert path.is_file(), f"Icon points at {path}, which is not in the repository"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] == im.size[1] <= 400


def test_requirements_mirror_the_project_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [x.strip() for x in (ROOT / "requirements.txt").read_text().splitlines() if x.strip()]
    assert reqs == meta["project"]["dependencies"]
