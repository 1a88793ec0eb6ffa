"""The pack's bridge to ComfyUI's model classes: the code beyond the node API that touches ``comfy.*``.

``unet`` (ComfyUI's own ``UNetModel`` built from a detected structure, wrapped in a ModelPatcher; a MODEL's
weights, structure and block map read back), ``patcher`` (the ModelPatcher class and weight loading ComfyUI's
own loaders use, by feature, on 0.3.64 and 0.33), ``condconv`` (CondConv layers that cast and offload like
``comfy.ops``), ``samples`` (ComfyUI LATENT / CONDITIONING values -> the distillation engine's samples),
``students`` (building a student of a MODEL), ``distill`` (a distillation run's plumbing, shared by the node and
``tools/distill.py``), ``judging`` (sampling teacher and students from the same noise and judging them, shared by
Evaluate Student and ``tools/evaluate.py``).

May import: ``comfy.*`` (never ``folder_paths``, ``server`` or the node API: tools and benches use these
modules with ComfyUI as a library) and ``models``.
"""
