"""The single list of node classes handed to ComfyUI (V3 API). Each feature module exports NODES."""

from comfy_api.latest import ComfyExtension, io

from . import attention, datasets, distill, evaluate, loaders, lora, sampling, students

NODE_CLASSES: list[type[io.ComfyNode]] = [
    *loaders.NODES,
    *sampling.NODES,
    *attention.NODES,
    *lora.NODES,
    *students.NODES,
    *distill.NODES,
    *datasets.NODES,
    *evaluate.NODES,
]


class DistilledUNetsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
