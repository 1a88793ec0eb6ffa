"""Distilled UNets for ComfyUI: registration only (ComfyUI's V3 node API)."""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """Called by ComfyUI (>= 0.3.64) when it loads the pack; returns the extension listing our nodes."""
    from .nodes import DistilledUNetsExtension

    return DistilledUNetsExtension()
