"""Evaluation while distilling: the contract between the distillation engine, which calls an evaluator every
few steps, and the evaluators, which judge the student against its teacher (``students.evaluate``).

The engine (``students.distill``) calls a :class:`StudentEvaluator` with the trained copy of the student:

* on rank 0 only (under ``torch.distributed`` the other processes wait, and the metrics are broadcast, so
  every rank agrees on which evaluation was the best);
* with the weights the run would save at that point (the EMA weights when EMA is on, else the raw ones),
  the module in eval mode, under ``torch.no_grad()``, on the engine's device; the evaluator must neither
  change the module nor keep a reference to it;
* before the first step (step 0; not again when a run resumes), every :attr:`EvalSchedule.every` steps, and
  after the last step (the weights the run returns; not when the run was stopped early: Cancel, Ctrl-C, or
  non-finite steps).

With no evaluator but held-out samples, the engine's own held-out output-KD error is the evaluator (metric
:data:`HELDOUT_KD`): the mean squared difference of the student's and the teacher's outputs on fixed held-out
samples, timesteps and noise.

An evaluator says which metrics it returns with a ``metric_names`` attribute (a tuple of names), so that a
:attr:`EvalSchedule.best_metric` it does not return is refused before the first step; without the attribute
the engine checks the first evaluation's result.

What the engine does with the result: appends ``{"step": s, **metrics}`` to the run's evaluations (the
``TrainResult``, the report, checkpoints, so a resumed run keeps them), hands them to the caller (``eval.csv``,
TensorBoard, Plot Loss Graph), and when :attr:`EvalSchedule.best_metric` is set and improved (by
:func:`higher_is_better`), hands the caller the CPU state dict of those weights to write as
``student-best.safetensors``; the best value and its step are kept in checkpoints.

The caller's side (``Distiller(evaluator=, eval_schedule=, on_eval=, save_best=)``): ``on_eval(step, metrics,
is_best)`` on every rank after each evaluation, ``save_best(step, cpu_state_dict)`` on rank 0 when the best
metric improved (the UNet's state dict, the EMA weights when EMA is on), right after that evaluation's
``on_eval``. The tensors are the run's one copy of the best weights, overwritten in place at the next
improvement: write them, or keep the dict as "the best so far" (the run counts that copy in its memory check
on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

#: metric name -> value; the names are those of ``students.evaluate`` (``psnr``, ``ssim``, ``fd_clip``, ...) and
#: ``heldout_kd`` (the engine's own held-out output-KD error)
Metrics = dict[str, float]

#: the engine's own metric: the held-out output-KD error (MSE of student vs teacher output on held-out samples)
HELDOUT_KD = "heldout_kd"

#: metrics where smaller is better; every other metric is better when larger
LOWER_IS_BETTER = frozenset({"heldout_kd", "fd_clip", "kid_clip", "cmmd", "fid", "fid_stats", "fid_stats_teacher",
                             "kid"})


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named as in :data:`Metrics` (a ``*_std`` / ``*_ci_*`` companion takes its base's)."""
    base = metric.split("_ci_")[0].removesuffix("_std")
    return base not in LOWER_IS_BETTER


class StudentEvaluator(Protocol):
    """Judges the student at one step of a run (see the module docstring for when and how it is called).
    Optionally declares ``metric_names: tuple[str, ...]``, the keys it returns."""

    def __call__(self, student: torch.nn.Module, step: int) -> Metrics: ...


def metric_names(evaluator) -> tuple[str, ...] | None:
    """The metrics an evaluator declares it returns (None: not declared)."""
    names = getattr(evaluator, "metric_names", None)
    return tuple(names) if names is not None else None


@dataclass(frozen=True)
class EvalSchedule:
    """When the engine evaluates, and which metric picks the best weights."""

    every: int = 0           # steps between evaluations; 0: only before the first and after the last step
    best_metric: str = ""    # a key of the evaluator's result; "" keeps no best weights

    def due(self, step: int, last: int) -> bool:
        """Whether the weights after ``step`` steps (of ``last``) are evaluated."""
        return step == 0 or step == last or (self.every > 0 and step % self.every == 0)

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`best_metric` beats ``best`` (None: nothing yet; NaN never beats)."""
        if not self.best_metric or value != value:  # NaN
            return False
        if best is None or best != best:
            return True
        return value > best if higher_is_better(self.best_metric) else value < best
