"""Host-free model code: torch, numpy and safetensors only; never imports ComfyUI (``comfy``, ``folder_paths``,
``server``, ``nodes``).

Four groups, each importing only the groups above it (and ``errors``, the typed errors all of them raise):

* ``structure`` - the one structure model: topologies, the published students and teachers, the
  diffusers<->ldm name map, the teacher<->student block map, cost, detection from tensors.
* ``files``     - reading and writing weight files: safetensors headers, diffusers folders, single files,
  full checkpoints, the pack's own metadata; the never-overwrite writer.
* ``patches``   - what changes how a UNet runs: multi-UNet routing, GRI attention, CondConv layers, LoRA
  key mapping.
* ``students``  - making and judging students: the builder, the distillation engine (``students.distill``).
"""
