"""The editor as people see it: headless Chromium (Debian's package, driven by playwright-core from
npm, no browser download) opens a real ComfyUI with this pack, checks the pack's JS extensions
loaded without errors and every pack node is in the node library, then loads every workflow in
workflows/ twice (``check_editor.mjs``):

* with none of its models installed: the editor's missing-models list (the dialog of frontend 1.2x,
  the Errors tab of later ones) names every model the workflow's loaders carry in
  ``properties.models``, with its folder and download URL, and nothing else;
* with its models present (empty files under those names): no missing-models notice, no missing
  nodes, widgets line up, every model name is an option of its combo; a screenshot of each goes to
  test-artifacts/screenshots/<ComfyUI version>/ (docs/screenshots holds the current frontend's; about
  1 MB). Everything else (the server's folders, the placeholder model files, Chromium's profile) is in a
  temporary folder removed when the report is read.

Skipped with a reason when Chromium, playwright-core or ComfyUI is absent.
Setup: ``apt-get install -y chromium`` and ``(cd tests/browser && npm ci)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from _host import REPO as ROOT
from _host import comfyui_version, find_comfyui, missing_reason
from _workflows import lacking_nodes
from comfy_server import ComfyServer

pytestmark = pytest.mark.browser

HERE = ROOT / "tests" / "browser"
SHOTS = ROOT / "test-artifacts" / "screenshots"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
OUR_JS = "/extensions/distilled_unets/"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "loras", "vae", "text_encoders")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    comfyui = find_comfyui()
    if comfyui is None:
        pytest.skip(missing_reason())
    if not os.path.isfile(CHROMIUM):
        pytest.skip("no Chromium (apt-get install -y chromium, or set CHROMIUM_PATH)")
    if shutil.which("node") is None:
        pytest.skip("no node.js to run playwright-core")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is not installed: run `npm ci` in tests/browser")
    tmp = tmp_path_factory.mktemp("browser")
    out = tmp / "report.json"
    models = tmp / "models"  # an extra models root, empty until check_editor.mjs writes placeholders
    for folder in MODEL_FOLDERS:
        (models / folder).mkdir(parents=True)
    workdir = tmp / "server"
    settings = workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # no first-run template browser; no minimap over the screenshots
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    shots = SHOTS / comfyui_version(comfyui)
    # the Chromium profile (tens of MB) goes to this module's temporary folder, removed below with the server's
    with ComfyServer(comfyui, [models], workdir=workdir) as server:
        object_info = server.object_info()
        # a workflow that needs ComfyUI's own nodes this version lacks (the dataset nodes before 0.33) is left
        # out: its missing-nodes dialog would stay open over the workflows loaded after it
        lacking = {p.stem: lacking_nodes(p.stem, object_info) for p in WORKFLOWS}
        runnable = [p for p in WORKFLOWS if not lacking[p.stem]]
        r = subprocess.run(["node", str(HERE / "check_editor.mjs"), server.url, str(shots), str(out), str(models),
                            *map(str, runnable)], cwd=HERE, capture_output=True, text=True, timeout=500,
                           env=dict(os.environ, CHROMIUM_PATH=CHROMIUM, TMPDIR=str(tmp)))
    assert r.returncode == 0, f"check_editor.mjs failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    rep["lacking"] = {k: v for k, v in lacking.items() if v}
    shutil.rmtree(tmp, ignore_errors=True)
    rep["pack_nodes"] = sorted(k for k, v in object_info.items()
                               if str(v.get("python_module", "")).endswith("distilled_unets"))
    return rep


def _without_urls(text: str) -> str:
    return re.sub(r"https?://\S+", "", text)


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def _loaded(report, name: str) -> dict:
    """The editor's findings for a workflow; a skip where this ComfyUI lacks core nodes it uses."""
    if name in report["lacking"]:
        pytest.skip(f"{name} needs ComfyUI nodes this version lacks: {', '.join(report['lacking'][name])}")
    return report["workflows"][name]


def test_pack_js_loaded_without_errors(report):
    ours = [f for f in report["jsFiles"] if OUR_JS in f["url"]]
    served = {f["url"].rsplit("/", 1)[-1] for f in ours if f["status"] == 200}
    on_disk = {p.name for p in (ROOT / "js").glob("*.js")}
    assert on_disk <= served, f"not served: {on_disk - served}"
    assert {"distilled_unets.modelInfo", "distilled_unets.multiUnetStrip"} <= set(report["extensions"])
    # a node name inside a URL the frontend fetched (e.g. its registry lookup of a node's pack, refused by
    # the page's content security policy) is not an error of ours: look at the text without URLs
    ours_console = [c for c in report["console"] if c["type"] == "error"
                    and (OUR_JS in c["url"] or "distilled" in _without_urls(c["text"]).lower())]
    assert not ours_console, ours_console
    ours_page = [e for e in report["pageErrors"] if OUR_JS in e or "distilled" in _without_urls(e).lower()]
    assert not ours_page, ours_page


def test_every_pack_node_in_node_library(report):
    assert report["pack_nodes"], "the server lists no node from this pack"
    missing = set(report["pack_nodes"]) - set(report["nodeTypes"])
    assert not missing, f"not in the editor's node library: {missing}"


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS])
def test_workflow_loads_without_missing_nodes(report, name):
    res = _loaded(report, name)
    wf = _workflow(name)
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


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS])
def test_missing_models_listed_with_folder_and_url(report, name):
    """Opened without its models, the workflow makes the editor list exactly the files its loaders name,
    each with the folder to put it in and where to download it."""
    _loaded(report, name)
    expected = {(m["name"], m["directory"], m["url"])
                for n in _workflow(name)["nodes"] for m in (n.get("properties") or {}).get("models", [])}
    assert expected, f"{name}: no loader carries properties.models"
    shown = report["missingModels"][name]
    assert shown["ui"] is not None, f"{name}: the editor showed no missing-models list"
    listed = {(r["name"], r["directory"], r["url"]) for r in shown["rows"]}
    assert listed == expected, f"{name} ({shown['ui']}): listed {sorted(listed)}, expected {sorted(expected)}"
    for row in shown["rows"]:  # "Copy URL" gives the file, or (later frontends) its Hugging Face page
        if row.get("copiedUrl") is not None:
            assert row["copiedUrl"] in (row["url"], row["url"].replace("/resolve/", "/blob/", 1)), row


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS])
def test_no_missing_models_notice_when_models_are_present(report, name):
    res = _loaded(report, name)
    assert not res["modelsShown"], f"{name}: missing-models notice although every file is in its folder"
    assert res["comboMissing"] == [], f"model names not offered by their loader's list: {res['comboMissing']}"
