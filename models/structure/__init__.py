"""The structure model: what a UNet is, independent of any file or host.

``topology`` (a UNet as levels, resnets, transformer depths; families), ``structures`` (the teachers, the
published recipes as functions of the teacher, every public student), ``names`` (the diffusers<->ldm name map),
``blockmap`` (which student block comes from which teacher block), ``registry`` (naming a detected structure),
``cost`` (parameters and MACs), ``detect`` (a topology from the tensors or a diffusers ``config.json``).

May import: torch and the standard library, ``models.errors``; nothing else of the pack.
"""
