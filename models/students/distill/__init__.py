"""Knowledge distillation of a student UNet from its teacher (BK-SDM, A-SDM), host-free: the one engine behind
the ``DistillStudentUNet`` node and the headless trainer ``tools/distill.py`` (one process or many under
``torchrun``).

Duck-typed on ComfyUI's openaimodel ``UNetModel`` (``input_blocks``, ``middle_block``, ``output_blocks``,
each a sequence of layers; ``forward(x, timesteps, context=, y=, transformer_options=)``) and on ComfyUI's
``model_sampling`` object (``sigmas``, ``timestep``, ``noise_scaling``, ``calculate_input``,
``calculate_denoised``); nothing here imports ComfyUI.

What one optimisation step does (BK-SDM's ``kd_train_text_to_image.py``, generalised):

* per micro-batch: samples by an epoch permutation, timesteps uniform over the schedule's training steps,
  Gaussian noise, all drawn from a generator seeded by ``(seed, step, micro-batch)`` so that a run resumed
  from a checkpoint draws exactly what the uninterrupted run drew;
* the noised input is made the way ComfyUI feeds its UNet (``noise_scaling`` then ``calculate_input``,
  timestep ``timestep(sigma)``), i.e. ``sqrt(a)x0 + sqrt(1-a)eps`` at step ``t`` for SD's discrete
  schedule; targets are epsilon or ``v = sqrt(a)eps - sqrt(1-a)x0``, exactly BK-SDM's scheduler targets;
* teacher forward under ``no_grad`` (outside inference mode), student forward, and
  ``loss = l_task MSE(out_s, target) + l_out MSE(out_s, out_t) + l_feat sum_i MSE(f_s,i, f_t,i)``
  (+ ``l_mid`` mid-block output, + ``l_vgg`` VGG term: A-SDM's semantic-aware supervision);
* backward (scaled by 1 / accumulation), then grad-norm clip 1, AdamW, EMA of the trained weights.

Feature points (:func:`feature_plan`): BK-SDM pairs the outputs of ``down_blocks.0-3`` and ``up_blocks.0-3``
(base/small); for its tiny student, whose deepest kept level lost its downsampler, the last attention's
``proj_out`` of that level. Here the pairing is derived from the two topologies: every level both models
have gives its down-stage output and its up-stage output, the tiny rule applies wherever the teacher
downsamples a level that the student does not, and ``+mid`` adds the mid-block output when both have a mid
The package, by part:

* ``plan.py`` - loss weights and the feature points paired between two topologies;
* ``data.py`` - training samples (in memory; ``datasets.py`` streams ComfyUI's training datasets through a
  sample index), the order they are drawn in (the same at any number of processes), a held-out split by seed,
  and the prefetch thread that reads the next micro-batches while a step runs;
* ``schedule.py`` - noising through the model's own sampling object;
* ``unet.py`` - the attention override, gradient checkpointing and feature taps on ComfyUI's UNet;
* ``memory.py`` - the up-front memory estimate;
* ``resources.py`` - what is free: the process's GPU, the RAM its cgroup (container) leaves, local processes;
* ``step.py`` - one optimisation step (loss, backward, non-finite check, clip, AdamW, EMA);
* ``checkpoints.py`` - resumable checkpoints (the run's identity, per-shard data digests, bounded count);
* ``fingerprint.py`` - content digests of a dataset's shard files, cached;
* ``distributed.py`` - DDP under ``torchrun``;
* ``engine.py`` - :class:`Distiller`, the run (evaluation while distilling: ``students/eval_hook.py``);
* ``runs.py`` - a run's output folder: one run per folder (``run.json``), csv logs, the disk it needs.
"""

from ..eval_hook import HELDOUT_KD, EvalSchedule
from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint_meta
from .config import FEATURE_MODES, PRECISIONS, DistillConfig, TrainResult
from .data import (
    HELDOUT_MAX,
    BatchOrder,
    KDData,
    Prefetcher,
    Subset,
    check_finite,
    draw_batch,
    heldout_indices,
    split_heldout,
    step_generator,
)
from .engine import Distiller
from .errors import CheckpointError, DiskSpaceError, DistillError, NonFiniteError, RunFolderError, TrainingMemoryError
from .memory import GIB, MemoryEstimate
from .plan import (
    BK_SDM_SAMPLES,
    PRESETS,
    TRAIN_MODES,
    FeaturePlan,
    FeaturePoint,
    LossWeights,
    choose_block_map,
    feature_plan,
    loss_weights,
    parse_loss_weights,
    trainable_filter,
    unet_layout,
)
from .schedule import NoisedBatch, NoiseSchedule
from .unet import enable_gradient_checkpointing, sdpa_attention

__all__ = ["LossWeights", "PRESETS", "FeaturePoint", "FeaturePlan", "feature_plan", "NoiseSchedule", "NoisedBatch",
           "KDData", "BatchOrder", "check_finite", "DistillConfig", "Distiller", "TrainResult", "MemoryEstimate",
           "DistillError", "TrainingMemoryError", "CheckpointError", "NonFiniteError", "DiskSpaceError",
           "RunFolderError", "sdpa_attention", "draw_batch", "enable_gradient_checkpointing", "read_checkpoint_meta",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "FEATURE_MODES", "PRECISIONS", "GIB", "step_generator",
           "unet_layout", "TRAIN_MODES", "loss_weights", "parse_loss_weights", "choose_block_map", "trainable_filter",
           "EvalSchedule", "HELDOUT_KD", "BK_SDM_SAMPLES", "HELDOUT_MAX", "Prefetcher", "Subset", "heldout_indices",
           "split_heldout"]
