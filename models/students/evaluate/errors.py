"""Typed errors of the evaluation (bad input a person can act on)."""

from __future__ import annotations

from ...errors import PackError


class EvaluationError(PackError):
    """An evaluation that cannot run as asked: a file that is not what it should be, statistics of another
    network, an empty prompt list, a size the model cannot take, a student of another family."""
