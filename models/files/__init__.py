"""Reading and writing weight files, host-free.

``weights`` (safetensors headers read without loading, diffusers folders, weights-only ``.ckpt``/``.pt``,
the never-overwrite writer ``save_new``), ``atomic`` (files written under a temporary name, then renamed) and
``loader`` (a UNet file or folder -> its detected structure, ldm-layout state dict, prediction type, the pack's
recipe and block map, the info text).

May import: torch, safetensors, the standard library, ``models.errors`` and ``models.structure``.
"""
