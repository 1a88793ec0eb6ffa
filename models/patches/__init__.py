"""What changes how a UNet runs, as host-free maths; the nodes apply it to a cloned ComfyUI model.

``multi_unet`` (A-SDM multi-UNet routing by sigma inside one sampler run), ``gri`` (A-SDM global-regional
self-attention), ``condconv`` (CondConv layers: the multi-expert convolution and its identity init),
``lora_keys`` (any LoRA format, the teacher's included, mapped onto a UNet block by block).

May import: torch, the standard library, ``models.errors`` and ``models.structure``.
"""
