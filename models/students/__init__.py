"""Making and judging students, host-free.

``builder`` (a student of any teacher: BK-SDM / SDXL block removal and A-SDM combinations, initialised
from the teacher), ``distill`` (the knowledge-distillation engine shared by the DistillStudentUNet node and
``tools/distill.py``: loss plan, data, schedule, step, checkpoints, torch.distributed), ``evaluate`` (judging a
student against its teacher: metrics, the Inception file, the generation plan, the report, the in-training
evaluator) and ``eval_hook`` (the contract by which the engine evaluates a student while it trains).

May import: torch, the standard library and every other group of ``models`` (``evaluate`` also numpy, scipy,
torchmetrics and torch-fidelity).
"""
