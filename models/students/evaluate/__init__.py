"""Judging a student against its teacher, host-free: the maths of DESIGN decision 12.

* ``metrics``   - the metric maths on 8-bit images and on feature vectors (torchmetrics, torch-fidelity and scipy
  where they have it; CMMD and the bootstrap's fast Frechet distance written here);
* ``inception`` - the FID Inception network from a file the user places (read weights-only) and reference
  statistics in pytorch-fid's ``.npz`` format;
* ``plan``      - the (prompt, seed) pairs, file names, each process's share, and the manifest of an image folder;
* ``report``    - :func:`judge` (every metric that applies, with bootstrap intervals and image counts) and the
  report a person reads;
* ``heldout``   - :class:`HeldoutEvaluator`, the evaluator the distillation engine calls every few steps
  (``students.eval_hook``): teacher and student sampled from the same noise on held-out conditionings.

The ComfyUI side (generating with ComfyUI's samplers, the VAE, CLIP vision and text towers) is
``nodes/host/judging.py``; the node is ``nodes/evaluate.py`` and the headless tool ``tools/evaluate.py``.

May import: torch, numpy, scipy, torchmetrics, torch-fidelity (for the Inception architecture), the standard
library and the other groups of ``models``.
"""

from .errors import EvaluationError
from .heldout import HeldoutEvaluator, sample_euler
from .inception import InceptionFeatures, load_inception, read_reference_stats, read_state_dict
from .plan import Pair, pairs, parse_prompts, share
from .report import INFO, ImageSet, Judgement, format_report, higher_is_better, judge

__all__ = ["EvaluationError", "HeldoutEvaluator", "sample_euler", "InceptionFeatures", "load_inception",
           "read_reference_stats", "read_state_dict", "Pair", "pairs", "parse_prompts", "share", "INFO", "ImageSet",
           "Judgement", "format_report", "higher_is_better", "judge"]
