"""The editor as people see it: headless Chromium (Debian's package, driven by playwright-core from
npm, no browser download) opens a real ComfyUI with this pack, checks the pack's JS extensions
loaded without errors, every pack node is in the node library, every workflow in workflows/ loads
with no missing nodes and its widgets line up, and saves a screenshot of each to
test-artifacts/screenshots/. Skipped with a reason when Chromium, playwright-core or ComfyUI is absent.

Setup: ``apt-get install -y chromium`` and ``(cd tests/browser && npm ci)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ..conftest import ROOT, find_comfyui

sys.path.insert(0, str(ROOT / "tools"))

from comfy_server import ComfyServer  # noqa: E402

pytestmark = pytest.mark.browser

HERE = ROOT / "tests" / "browser"
SHOTS = ROOT / "test-artifacts" / "screenshots"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
OUR_JS = "/extensions/distilled_unets/"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    comfyui = find_comfyui()
    if comfyui is None:
        pytest.skip("no ComfyUI found (set COMFYUI_PATH, or put ComfyUI at ~/ComfyUI)")
    if not os.path.isfile(CHROMIUM):
        pytest.skip("no Chromium (apt-get install -y chromium, or set CHROMIUM_PATH)")
    if shutil.which("node") is None:
        pytest.skip("no node.js to run playwright-core")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is not installed: run `npm ci` in tests/browser")
    tmp = tmp_path_factory.mktemp("browser")
    out = tmp / "report.json"
    with ComfyServer(comfyui, workdir=tmp / "server") as server:
        object_info = server.object_info()
        r = subprocess.run(["node", str(HERE / "check_editor.mjs"), server.url, str(SHOTS), str(out),
                            *map(str, WORKFLOWS)], cwd=HERE, capture_output=True, text=True, timeout=400,
                           env=dict(os.environ, CHROMIUM_PATH=CHROMIUM))
    assert r.returncode == 0, f"check_editor.mjs failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    rep["pack_nodes"] = sorted(k for k, v in object_info.items()
                               if str(v.get("python_module", "")).endswith("distilled_unets"))
    return rep


def test_pack_js_loaded_without_errors(report):
    ours = [f for f in report["jsFiles"] if OUR_JS in f["url"]]
    served = {f["url"].rsplit("/", 1)[-1] for f in ours if f["status"] == 200}
    on_disk = {p.name for p in (ROOT / "js").glob("*.js")}
    assert on_disk <= served, f"not served: {on_disk - served}"
    assert {"distilled_unets.modelInfo", "distilled_unets.multiUnetStrip"} <= set(report["extensions"])
    ours_console = [c for c in report["console"] if c["type"] == "error"
                    and (OUR_JS in c["url"] or "distilled" in c["text"].lower())]
    assert not ours_console, ours_console
    ours_page = [e for e in report["pageErrors"] if OUR_JS in e or "distilled" in e.lower()]
    assert not ours_page, ours_page


def test_every_pack_node_in_node_library(report):
    assert report["pack_nodes"], "the server lists no node from this pack"
    missing = set(report["pack_nodes"]) - set(report["nodeTypes"])
    assert not missing, f"not in the editor's node library: {missing}"


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS])
def test_workflow_loads_without_missing_nodes(report, name):
    res = report["workflows"][name]
    wf = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    assert res["missing"] == [], f"missing node types: {res['missing']}"
    assert res["nodeCount"] == len(wf["nodes"])
    assert res["widgetMismatch"] == [], f"widgets_values do not match the node's widgets: {res['widgetMismatch']}"
    assert not any("missing" in d.lower() and "node" in d.lower() for d in res["dialogs"]), res["dialogs"]
    with open(res["screenshot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    loaders = [n for n in wf["nodes"] if n["type"] == "DistilledUNetLoader"]
    assert len(res["modelInfo"]) == len(loaders)
    for info in res["modelInfo"]:  # js/model_info.js shows the loader's ui text, without touching widgets_values
        assert info["shown"].startswith("(shown after a run) detected: family, teacher")
        assert info["serializedUnchanged"]
