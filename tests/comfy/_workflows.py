"""Shared check of a shipped workflow's pack nodes against the pack's own node schemas."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
#: workflows that need ComfyUI nodes only newer versions have: workflow -> those nodes (the dataset nodes: 0.33)
NEEDS_NODES = {"distill_from_dataset_sd15": ("LoadImageTextDataSetFromFolder", "MakeTrainingDataset",
                                             "SaveTrainingDataset")}


def lacking_nodes(name: str, object_info: dict) -> list[str]:
    """The ComfyUI nodes workflow ``name`` needs that this server lacks (empty where it can run)."""
    return [t for t in NEEDS_NODES.get(name, ()) if t not in object_info]


def load(name: str) -> dict:
    wf = json.loads((WORKFLOWS / name).read_text())
    assert wf["version"] == 0.4
    return wf


def check_pack_nodes(wf: dict) -> None:
    """Every pack node of ``wf``: one widget value per widget input (plus the control value after a
    seed), numbers inside their bounds, and the socket inputs exactly the schema's non-widget inputs."""
    from comfy_api.latest import io
    from distilled_unets.nodes import NODE_CLASSES

    widget_types = (io.Int.Input, io.Float.Input, io.Combo.Input, io.String.Input, io.Boolean.Input)
    ours = {c.define_schema().node_id: c.define_schema() for c in NODE_CLASSES}
    for n in wf["nodes"]:
        schema = ours.get(n["type"])
        if schema is None:
            continue
        widgets = [i for i in schema.inputs if isinstance(i, widget_types)]
        values = list(n["widgets_values"])
        expect = len(widgets) + sum(1 for i in widgets if getattr(i, "control_after_generate", False))
        assert len(values) == expect, (n["type"], values)
        for w in widgets:
            val = values.pop(0)
            if getattr(w, "control_after_generate", False):
                values.pop(0)  # "fixed" / "randomize": the frontend's control value, not an input
            if isinstance(w, (io.Int.Input, io.Float.Input)):
                assert w.min <= val <= w.max, (n["type"], w.id, val)
        sockets = {i.id for i in schema.inputs} - {i.id for i in widgets}
        assert {i["name"] for i in n.get("inputs", [])} == sockets, n["type"]
