"""The engine's typed errors (each names the node and input where it can)."""

from __future__ import annotations

from ...errors import PackError


class DistillError(PackError):
    """Distillation settings or inputs that cannot work (nothing to train, mismatched models, bad data)."""


class TrainingMemoryError(DistillError):
    """The estimated training memory exceeds what the device has free (raised before the first step)."""

    def __init__(self, problem: str, fix: str, *, estimate=None, free_bytes: int = 0, **kw):
        super().__init__(problem, fix, **kw)
        self.estimate = estimate
        self.free_bytes = free_bytes


class CheckpointError(DistillError):
    """A training checkpoint that cannot be resumed from."""


class NonFiniteError(DistillError):
    """Several steps in a row had a non-finite loss or gradient: the run stopped with the last good weights.

    ``result`` holds the run so far (its ``state_dict`` is the last good weights), ``checkpoint`` the checkpoint
    written with them (None without a checkpoint folder), ``step`` the first bad step of the final streak."""

    def __init__(self, problem: str, fix: str, *, step: int = 0, checkpoint: str | None = None, result=None, **kw):
        super().__init__(problem, fix, **kw)
        self.step = step
        self.checkpoint = checkpoint
        self.result = result


class DiskSpaceError(DistillError):
    """The run's files (checkpoints kept, the student, the best student) would not fit the free disk space."""

    def __init__(self, problem: str, fix: str, *, needed: int = 0, free: int = 0, **kw):
        super().__init__(problem, fix, **kw)
        self.needed = needed
        self.free = free


class RunFolderError(DistillError):
    """The output folder holds files of another run (or is not a folder): nothing would be overwritten or mixed."""
