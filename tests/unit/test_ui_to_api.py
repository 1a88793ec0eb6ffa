"""UI -> API workflow conversion (tools/ui_to_api.py) on hand-built graphs; no ComfyUI needed."""

from __future__ import annotations

import pytest
from ui_to_api import UnknownNodeError, convert, widget_slots

OI = {
    "Loader": {"input": {"required": {"name": ["COMBO", {"options": ["a.safetensors"]}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {}], "sampler": [["euler", "heun"]],
                                       "cfg": ["FLOAT", {}]},
                          "optional": {"note": ["STRING", {}], "extra": ["MODEL", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "sampler", "cfg"],
                                "optional": ["note", "extra"]},
                "output": ["LATENT"]},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "scale": ["FLOAT", {}]}},
              "input_order": {"required": ["model", "scale"]}, "output": ["MODEL"]},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE"]},
}


def node(i, typ, wv=None, inputs=(), mode=0, outputs=("MODEL",)):
    return {"id": i, "type": typ, "mode": mode, "widgets_values": wv,
            "inputs": [dict(x) for x in inputs], "outputs": [{"name": o, "type": o} for o in outputs]}


def test_widget_slots_count_control_and_upload():
    assert widget_slots(OI["Sampler"]) == [("seed", ("control",)), ("steps", ()), ("sampler", ()),
                                           ("cfg", ()), ("note", ())]
    assert widget_slots(OI["LoadImage"]) == [("image", ("upload",))]


def test_widgets_links_and_control_slot():
    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]),
                    node(2, "Sampler", [5, "randomize", 20, "heun", 7.5, "hi"],
                         [{"name": "model", "type": "MODEL", "link": 1}])],
          "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    p = convert(wf, OI)
    assert p["1"] == {"class_type": "Loader", "inputs": {"name": "a.safetensors"}, "_meta": {"title": "Loader"}}
    assert p["2"]["inputs"] == {"model": ["1", 0], "seed": 5, "steps": 20, "sampler": "heun", "cfg": 7.5,
                                "note": "hi"}


def test_old_file_without_control_slot_and_legacy_bool():
    wf = {"nodes": [node(2, "Sampler", [5, 20, "euler", 7.0])], "links": []}
    assert convert(wf, OI)["2"]["inputs"] == {"seed": 5, "steps": 20, "sampler": "euler", "cfg": 7.0}
    wf = {"nodes": [node(2, "Sampler", [5, True, 1, "euler", 7.0])], "links": []}
    assert convert(wf, OI)["2"]["inputs"]["steps"] == 1


def test_upload_slot_skipped():
    wf = {"nodes": [node(1, "LoadImage", ["x.png", "image"], outputs=("IMAGE",))], "links": []}
    assert convert(wf, OI)["1"]["inputs"] == {"image": "x.png"}


def test_converted_widget_linked_from_primitive_and_reroute():
    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]),
                    node(3, "Reroute", None, [{"name": "", "type": "*", "link": 1}], outputs=("MODEL",)),
                    node(4, "PrimitiveNode", [123, "fixed"], outputs=("INT",)),
                    node(5, "Note", ["text"]), node(6, "MarkdownNote", ["# hi"]),
                    node(2, "Sampler", [0, "fixed", 20, "euler", 7.0],
                         [{"name": "model", "type": "MODEL", "link": 2},
                          {"name": "seed", "type": "INT", "link": 3, "widget": {"name": "seed"}}])],
          "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 3, 0, 2, 0, "MODEL"], [3, 4, 0, 2, 1, "INT"]]}
    p = convert(wf, OI)
    assert set(p) == {"1", "2"}
    assert p["2"]["inputs"]["model"] == ["1", 0] and p["2"]["inputs"]["seed"] == 123


def test_bypassed_node_passes_through_and_muted_node_dropped():
    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]),
                    node(7, "Patch", [2.0], [{"name": "model", "type": "MODEL", "link": 1}], mode=4),
                    node(8, "Patch", [3.0], [{"name": "model", "type": "MODEL", "link": 4}], mode=2),
                    node(2, "Sampler", [1, "fixed", 2, "euler", 1.0, ""],
                         [{"name": "model", "type": "MODEL", "link": 2},
                          {"name": "extra", "type": "MODEL", "link": 3}])],
          "links": [[1, 1, 0, 7, 0, "MODEL"], [2, 7, 0, 2, 0, "MODEL"], [3, 8, 0, 2, 6, "MODEL"],
                    [4, 1, 0, 8, 0, "MODEL"]]}
    p = convert(wf, OI)
    assert set(p) == {"1", "2"}
    assert p["2"]["inputs"]["model"] == ["1", 0]
    assert "extra" not in p["2"]["inputs"]


def test_unknown_node_named():
    wf = {"nodes": [node(9, "FancyNodeFromElsewhere", [])], "links": []}
    with pytest.raises(UnknownNodeError, match="FancyNodeFromElsewhere") as e:
        convert(wf, OI)
    assert e.value.node_id == 9


def test_dict_widgets_values_and_v1_combo():
    wf = {"nodes": [node(2, "Sampler", {"seed": 3, "steps": 4, "sampler": "heun", "cfg": 1.5})], "links": []}
    assert convert(wf, OI)["2"]["inputs"] == {"seed": 3, "steps": 4, "sampler": "heun", "cfg": 1.5}


def test_control_slot_follows_an_explicit_control_after_generate():
    """Frontends add a control widget to an INT named seed only when the spec does not say otherwise."""
    info = {"input": {"required": {"seed": ["INT", {"control_after_generate": False}], "noise_seed": ["INT", {}],
                                   "other": ["INT", {"control_after_generate": True}]}},
            "input_order": {"required": ["seed", "noise_seed", "other"]}}
    assert widget_slots(info) == [("seed", ()), ("noise_seed", ("control",)), ("other", ("control",))]
