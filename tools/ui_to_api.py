"""Convert a UI-format ComfyUI workflow (what people save and share) into the API format ``/prompt`` takes.

Host-free: needs only the workflow dict and the server's ``/object_info`` dict (node class ->
input specs). ComfyUI core has no server-side converter (the frontend's ``graphToPrompt`` does it
in JS), so this one follows the same rules:

* ``widgets_values`` is positional over the widget inputs in ``input_order`` (required, then
  optional), with one extra slot after every INT/COMBO that has a "control after generate" widget
  (``control_after_generate`` in the spec, or an INT named ``seed``/``noise_seed``) and one after
  an upload combo (``image_upload`` etc.). A dict ``widgets_values`` is read by name.
* An input with a non-null ``link`` is a link, even when it was converted from a widget (its
  ``widgets_values`` slot is still present and is skipped).
* ``Note``, ``MarkdownNote`` and ``Reroute`` are dropped (links are followed through reroutes);
  a ``PrimitiveNode``'s value is written into every input it feeds.
* Muted nodes (mode 2) are dropped, with every input that came from them; bypassed nodes
  (mode 4) are passed through: a consumer of their output gets the bypassed node's input of the
  same type instead.
* A node type the server does not know raises :class:`UnknownNodeError` naming it.

Usage: ``python tools/ui_to_api.py workflow.json object_info.json > prompt.json``.
"""

from __future__ import annotations

import json
import sys

__all__ = ["ConversionError", "UnknownNodeError", "convert", "widget_slots"]

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_VALUES = ("image", "video", "audio", "file", None)
VIRTUAL_DROP = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
MODE_MUTED = 2
MODE_BYPASS = 4


class ConversionError(ValueError):
    """The workflow cannot be turned into an API prompt; the message says which node and why."""


class UnknownNodeError(ConversionError):
    """The workflow names a node type the server does not know (a missing custom node pack)."""

    def __init__(self, node_type: str, node_id):
        self.node_type = node_type
        self.node_id = node_id
        super().__init__(f"node {node_id} is of type {node_type!r}, which this ComfyUI does not know: "
                         f"install the custom node pack that provides {node_type!r} (or check its spelling)")


def _spec_parts(spec) -> tuple[object, dict]:
    typ = spec[0] if spec else None
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return typ, opts


def widget_slots(info: dict) -> list[tuple[str, tuple[str, ...]]]:
    """``[(input name, extra slot kinds)]`` for one node's ``/object_info`` entry, in widgets_values order.

    The extra kinds are ``"control"`` (control_after_generate) and ``"upload"`` (an upload button's value).
    """
    inputs = info.get("input", {})
    order = info.get("input_order") or {s: list(inputs.get(s, {}) or {}) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {}) or {}
        for name in order.get(section, []):
            if name not in specs:
                continue
            typ, opts = _spec_parts(specs[name])
            is_combo = isinstance(typ, list) or typ == "COMBO"
            if not (is_combo or typ in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            extra = []
            # an explicit control_after_generate decides; without one, frontends add it to INTs named seed
            legacy = typ == "INT" and name in ("seed", "noise_seed")
            if opts.get("control_after_generate", legacy):
                extra.append("control")
            if any(k.endswith("_upload") and v for k, v in opts.items()):
                extra.append("upload")
            out.append((name, tuple(extra)))
    return out


def _is_control(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, str) and v in CONTROL_VALUES)


def _widget_values(node: dict, info: dict) -> dict:
    """Input name -> value from a node's ``widgets_values`` (control/upload slots skipped)."""
    wv = node.get("widgets_values")
    if wv is None:
        return {}
    slots = widget_slots(info)
    if isinstance(wv, dict):
        return {name: wv[name] for name, _ in slots if name in wv}
    values, pos = {}, 0
    for name, extra in slots:
        if pos >= len(wv):
            break
        values[name] = wv[pos]
        pos += 1
        for kind in extra:
            # Consume the slot only when it holds what that widget stores: files written by older
            # frontends have no control slot, and bundled templates mix true/"randomize".
            if pos < len(wv) and ((kind == "control" and _is_control(wv[pos]))
                                  or (kind == "upload" and wv[pos] in UPLOAD_VALUES)):
                pos += 1
    return values


def convert(workflow: dict, object_info: dict) -> dict:
    """API-format prompt ``{node id: {"class_type", "inputs", "_meta"}}`` from a UI-format workflow."""
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        if isinstance(workflow, dict) and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return workflow  # already API format
        raise ConversionError("not a UI-format workflow: no 'nodes' list")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("the workflow uses subgraphs, which this converter does not expand; "
                              "unpack the subgraph in the editor and save again")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4])

    def input_link(node, name=None, index=None, typ=None):
        for i, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            if (name is not None and inp.get("name") == name) or (index is not None and i == index) \
                    or (typ is not None and inp.get("type") == typ):
                return inp["link"]
        return None

    def resolve(link_id, seen=()):
        """Follow a link to ``("link", [id, slot])``, ``("value", v)`` or ``None`` (dropped)."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        seen = (*seen, link_id)
        origin, slot, _, _ = links[link_id]
        src = nodes.get(origin)
        if src is None:
            return None
        typ = src.get("type")
        mode = src.get("mode", 0)
        if typ == REROUTE:
            return resolve(input_link(src, index=0), seen)
        if typ == PRIMITIVE:
            wv = src.get("widgets_values") or []
            return ("value", wv[0]) if wv else None
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            outs = src.get("outputs") or []
            out_type = outs[slot].get("type") if slot < len(outs) else None
            ins = src.get("inputs") or []
            same_slot = ins[slot] if slot < len(ins) else None
            if same_slot and same_slot.get("type") == out_type and same_slot.get("link") is not None:
                return resolve(same_slot["link"], seen)
            return resolve(input_link(src, typ=out_type), seen)
        return ("link", [str(origin), slot])

    prompt = {}
    for nid, node in sorted(nodes.items(), key=lambda kv: str(kv[0])):
        typ = node.get("type")
        if typ in VIRTUAL_DROP or typ in (REROUTE, PRIMITIVE):
            continue
        mode = node.get("mode", 0)
        if mode in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(typ)
        if info is None:
            raise UnknownNodeError(typ, nid)
        inputs = _widget_values(node, info)
        for inp in node.get("inputs") or []:
            name = inp.get("name")
            if inp.get("link") is None:
                continue
            res = resolve(inp["link"])
            if res is None:
                inputs.pop(name, None)
            else:
                inputs[name] = res[1]
        title = node.get("title") or info.get("display_name") or typ
        prompt[str(nid)] = {"class_type": typ, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write(__doc__.split("\n\n")[-1] + "\n")
        return 2
    with open(argv[0], encoding="utf-8") as f:
        wf = json.load(f)
    with open(argv[1], encoding="utf-8") as f:
        oi = json.load(f)
    try:
        prompt = convert(wf, oi)
    except ConversionError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    sys.stdout.write(json.dumps(prompt, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
