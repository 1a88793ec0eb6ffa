"""The distillation run: a trainable copy of the student trained toward the teacher (see the package docstring
for what one step does). Setup and the run loop live here; the loss of a micro-batch and the optimizer step are
``step.py``, checkpoints ``checkpoints.py``, the memory estimate ``memory.py``."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...structure.topology import Topology
from ..eval_hook import HELDOUT_KD, EvalSchedule, Metrics, StudentEvaluator, metric_names
from . import checkpoints, distributed, resources
from . import step as S
from .config import DistillConfig, TrainResult, autocast_dtype
from .data import BatchOrder, KDData, Prefetcher, draw_batch, step_generator
from .errors import DistillError, NonFiniteError, TrainingMemoryError
from .memory import GIB, MemoryEstimate, activation_profile
from .plan import feature_plan
from .schedule import NoisedBatch, NoiseSchedule
from .unet import Taps, enable_gradient_checkpointing, sdpa_attention

log = logging.getLogger("distilled_unets")


def _default_device(teacher) -> torch.device:
    """CUDA when there is one (a teacher under ComfyUI's dynamic VRAM keeps its weights on the CPU and
    streams them: where its parameters are says nothing about where it computes), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return next(teacher.parameters()).device


class Distiller:
    """One distillation run: a trainable copy of the student, trained toward the teacher.

    The inputs (both UNets, data) are never modified: the student is copied (trainable parameters as fp32
    master weights on ``device``), hooks are removed when the run ends, the teacher runs under ``no_grad``.
    ``trainable(name)`` selects the student parameters that train (ldm names inside the UNet); the rest stay
    bit-identical. Under ``torch.distributed`` each process trains its share of every global batch and DDP
    averages the gradients (``distributed.py``); ``batch_size`` is per process.

    ``prefetch``: micro-batches read and prepared ahead by a background thread while the step runs (pinned on
    CUDA, copied to the device without blocking); 0 reads each in the step loop. The draws and the results are
    the same either way. ``ema_thread``: whether an EMA kept on the host (``ema_on_host``) is updated by a host
    thread from pinned copies (None: on CUDA only; a CPU run's host is its device).
    """

    def __init__(self, *, teacher, student, teacher_topology: Topology, student_topology: Topology,
                 schedule: NoiseSchedule, data, config: DistillConfig, heldout: KDData | None = None,
                 trainable: Callable[[str], bool] | None = None, semantic=None,
                 device: torch.device | str | None = None, teacher_transformer_options: dict | None = None,
                 teacher_dtype: torch.dtype | None = None, node: str = "DistillStudentUNet", prefetch: int = 2,
                 evaluator: StudentEvaluator | None = None, eval_schedule: EvalSchedule | None = None,
                 on_eval: Callable[[int, Metrics, bool], None] | None = None,
                 save_best: Callable[[int, dict[str, torch.Tensor]], None] | None = None):
        config.validate()
        self.teacher, self.student = teacher, student
        self.tt, self.st = teacher_topology, student_topology
        self.schedule, self.data, self.heldout, self.cfg = schedule, data, heldout, config
        self.semantic = semantic
        self.node = node
        self.device = torch.device(device) if device is not None else _default_device(teacher)
        self.rank, self.world_size = distributed.rank_world()
        self.teacher_opts = dict(teacher_transformer_options or {})
        self._t_dtype = teacher_dtype
        self.trainable = trainable or (lambda name: True)
        self.autocast = autocast_dtype(config.precision, self.device)
        if self.autocast is not None and self.device.type == "cpu" and self.autocast == torch.float16:
            raise DistillError("fp16 autocast on CPU", "use fp32 or bf16 on CPU", input_name="precision")
        self._check_models()
        w = config.weights
        self.plan = feature_plan(teacher_topology, student_topology,
                                 stages=config.features != "none" and w.feat > 0,
                                 mid=config.features == "stages+mid" and w.mid_weight > 0)
        self.train_names = [n for n, _ in student.named_parameters() if self.trainable(n)]
        if not self.train_names:
            raise DistillError("nothing to train: every student parameter is frozen by this choice",
                               "choose 'all', or a student that has blocks of its own", node=node, input_name="train")
        self.trainable_params = sum(p.numel() for n, p in student.named_parameters() if self.trainable(n))
        self._buckets = data.buckets()
        self._order = BatchOrder(config.seed, [len(ix) for _, ix in self._buckets])
        self._estimates: dict[bool, MemoryEstimate] = {}
        self.prefetch = max(0, int(prefetch))
        self._feed: Prefetcher | None = None
        self.data_waits: list[float] = []  # seconds each step of the last run waited for its data
        self._wait = 0.0
        self.ema_thread: bool | None = None
        self._ema_job = None
        self._params_copying = None
        self._run_id: str | None = None
        self._evals: list[dict] = []
        self._best: dict | None = None
        self._best_buffer: dict[str, torch.Tensor] | None = None
        self._setup_evaluation(evaluator, eval_schedule or EvalSchedule(), on_eval, save_best)

    # ---- identity and evaluation ----------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """What makes another run the same run (``checkpoints.run_key``); computed on first use (a streamed
        dataset's shards are hashed then)."""
        if self._run_id is None:
            self._run_id = checkpoints.run_key(self.cfg, self.cfg.batch_size * self.world_size,
                                               self.data.fingerprint(), self.st.describe(), self.train_names)
        return self._run_id

    def loss_terms(self) -> list[str]:
        """The loss terms a step reports (besides ``loss``)."""
        w = self.cfg.weights
        terms = ["task", "out"]
        if any(p.kind != "mid" for p in self.plan.points):
            terms.append("feat")
        if any(p.kind == "mid" for p in self.plan.points):
            terms.append("mid")
        if self.semantic is not None and w.vgg_weight > 0:
            terms.append("vgg")
        return terms

    def checkpoint_bytes(self, steps: int | None = None) -> int:
        """What one checkpoint of this run weighs on disk (at ``steps``, by default the last step)."""
        return checkpoints.size(self, self.cfg.steps if steps is None else steps)

    def _setup_evaluation(self, evaluator, schedule: EvalSchedule, on_eval, save_best) -> None:
        """What is evaluated: the held-out output-KD error (``heldout_kd``) whenever there are held-out samples,
        plus the given evaluator's metrics (the image metrics of ``students.evaluate``); its schedule, and the
        best metric checked against what the evaluation returns."""
        self.eval_schedule = schedule
        self._on_eval, self._save_best = on_eval, save_best
        self._kd_eval = self.heldout is not None and len(self.heldout) > 0
        self.evaluator = evaluator
        own = (HELDOUT_KD,) if self._kd_eval else ()
        declared = metric_names(evaluator) if evaluator is not None else ()
        self.metric_names = None if declared is None else own + tuple(declared)
        if schedule.every < 0:
            raise DistillError(f"eval_every is {schedule.every}", "set 0 (before and after the run) or more",
                               node=self.node, input_name="eval_every")
        best = schedule.best_metric
        if best and not self.evaluates:
            raise DistillError(f"the best metric is {best!r} but nothing is evaluated (no held-out samples)",
                               "give held-out data (the held-out output-KD error is heldout_kd), or no best metric",
                               node=self.node, input_name="best_metric")
        if best and self.metric_names is not None and best not in self.metric_names:
            raise DistillError(f"the best metric {best!r} is not one the evaluation gives "
                               f"({', '.join(self.metric_names) or 'none'})",
                               f"pick one of {', '.join(self.metric_names)}", node=self.node,
                               input_name="best_metric")

    @property
    def evaluates(self) -> bool:
        return self._kd_eval or self.evaluator is not None

    @contextlib.contextmanager
    def _eval_weights(self, model):
        """The weights the run would save, put into the trained copy (the EMA ones when EMA is on, as of its last
        update: tensors exchanged where the EMA lives with the weights; copied in and back where it lives in host
        memory, the raw weights kept there meanwhile), in eval mode under ``no_grad``; everything as it was
        afterwards."""
        swap = self._ema is not None
        params = dict(zip(self.train_names, self._params))
        kept: dict[str, torch.Tensor] = {}
        if swap:
            S.ema_join(self)  # a host EMA update in flight lands first
            with torch.no_grad():
                for n, p in params.items():
                    e = self._ema[n]
                    if e.device == p.device and e.dtype == p.dtype:
                        p.data, self._ema[n] = e, p.data
                    else:
                        kept[n] = p.detach().to(e.device, copy=True)
                        p.copy_(e)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train(was_training)
            if swap:
                with torch.no_grad():
                    for n, p in params.items():
                        if n in kept:
                            p.copy_(kept.pop(n))
                        else:
                            p.data, self._ema[n] = self._ema[n], p.data

    def _evaluate(self, model, step: int, *, raw_too: bool = False) -> Metrics | None:
        """Evaluate the weights after ``step`` steps on rank 0 (the others wait) and share the metrics with every
        rank; record them, keep the best, and hand them to the caller."""
        if not self.evaluates:
            return None
        payload = {"metrics": None, "error": None, "raw": None}
        state = None
        if distributed.is_writer():
            try:
                if raw_too and self._kd_eval and self._ema is not None:  # the raw weights too, for the report
                    was_training = model.training
                    model.eval()
                    try:
                        payload["raw"] = self._heldout_error(model)
                    finally:
                        model.train(was_training)
                with self._eval_weights(model) as m:
                    got = dict(self._heldout_metrics(m)) if self._kd_eval else {}
                    if self.evaluator is not None:
                        got.update(self.evaluator(m, step))
                    metrics = {str(k): float(v) for k, v in got.items()}
                    best = self.eval_schedule.best_metric
                    if best and best not in metrics:
                        raise DistillError(f"the best metric {best!r} is not among the metrics the evaluation "
                                           f"gave ({', '.join(metrics) or 'none'})", "pick one of those",
                                           node=self.node, input_name="best_metric")
                    if self._save_best is not None and best and self.eval_schedule.improved(
                            metrics[best], self._best["value"] if self._best else None):
                        state = self._best_copy(m)
                payload["metrics"] = metrics
            except Exception as e:  # every rank must learn of it (the others wait for the metrics)
                payload["error"] = f"{type(e).__name__}: {e}"
                distributed.broadcast_object(payload)
                raise
        payload = distributed.broadcast_object(payload)
        if payload["error"] is not None:
            raise DistillError(f"the evaluation on rank 0 failed ({payload['error']})", "see rank 0's error",
                               node=self.node, input_name="eval_every")
        metrics = payload["metrics"]
        if payload["raw"] is not None:
            self._raw_after = payload["raw"]
        best = self.eval_schedule.best_metric
        is_best = bool(best) and self.eval_schedule.improved(metrics[best], self._best["value"] if self._best
                                                             else None)
        if is_best:
            self._best = {"metric": best, "value": metrics[best], "step": step}
        self._evals.append({"step": step, **metrics})
        if self._on_eval is not None:
            self._on_eval(step, dict(metrics), is_best)
        if is_best and state is not None:
            self._save_best(step, state)
        return metrics

    def _best_copy(self, model) -> dict[str, torch.Tensor]:
        """The weights of ``model`` in CPU tensors the run keeps for the best evaluation, overwritten in place at
        the next improvement (one copy in memory however often the best improves)."""
        sd = model.state_dict()
        if self._best_buffer is None:
            self._best_buffer = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                self._best_buffer[k].copy_(v.detach())
        return dict(self._best_buffer)  # the caller's dict (it may pop keys); the tensors are the one copy

    def best_copy_bytes(self) -> int:
        """Host memory the best weights take while the run keeps them (a best metric and a caller that takes
        them); 0 otherwise."""
        if not (self.eval_schedule.best_metric and self._save_best is not None):
            return 0
        return checkpoints.student_bytes(self)

    def _heldout_metrics(self, model) -> Metrics:
        return {HELDOUT_KD: self._heldout_error(model)}

    def _restore_best(self) -> None:
        """The best evaluation by the current best metric among the restored ones."""
        self._best = None
        best = self.eval_schedule.best_metric
        for e in self._evals:
            if best and best in e and self.eval_schedule.improved(e[best], self._best["value"] if self._best
                                                                  else None):
                self._best = {"metric": best, "value": e[best], "step": e["step"]}

    # ---- checks ---------------------------------------------------------------------------------
    def _check_models(self):
        tt, st, node = self.tt, self.st, self.node
        if (tt.context_dim, tt.adm_in_channels, tt.in_channels, tt.out_channels) != \
                (st.context_dim, st.adm_in_channels, st.in_channels, st.out_channels):
            raise DistillError(
                f"teacher ({tt.family}, context {tt.context_dim}, {tt.in_channels} latent channels) and student "
                f"({st.family}, context {st.context_dim}, {st.in_channels} latent channels) do not share latent "
                "space and conditioning", "distil a student of the teacher's family", node=node, input_name="student")
        c = self.data.channels
        if c != st.in_channels:
            raise DistillError(f"the latents have {c} channels, the models take {st.in_channels}",
                               "encode the images with this model family's VAE", node=node, input_name="latents")
        if self.data.context_dim != st.context_dim:
            raise DistillError(f"the conditioning is {self.data.context_dim} wide, the models take {st.context_dim}",
                               "encode the captions with this model family's text encoder (CLIP)", node=node,
                               input_name="conditioning")
        if bool(st.adm_in_channels) != self.data.has_y:
            raise DistillError("SDXL-class models need pooled/size conditioning (and others must not get it)",
                               "make the conditioning with this family's CLIP Text Encode node", node=node,
                               input_name="conditioning")

    # ---- memory ---------------------------------------------------------------------------------
    def estimate_memory(self, *, teacher_resident: bool = False) -> MemoryEstimate:
        """The device memory the run needs (the largest latent size of the data), from a ``meta`` pass."""
        if teacher_resident in self._estimates:
            return self._estimates[teacher_resident]
        cfg = self.cfg
        h, w = max((s[-2:] for s, _ in self._buckets), key=lambda hw: hw[0] * hw[1])
        act_dtype = self.autocast or torch.float32
        itemsize = torch.finfo(act_dtype).bits // 8
        frozen_bytes = sum(p.numel() for n, p in self.student.named_parameters() if not self.trainable(n)) * itemsize
        buffers = sum(b.numel() * b.element_size() for b in self.student.buffers())
        student_w = self.trainable_params * 4 + frozen_bytes + buffers
        teacher_w = 0 if teacher_resident else sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        y_dim = self.st.adm_in_channels or 0
        prof = activation_profile(self.student, (1, self.st.in_channels, h, w),
                                   (1, self.data.max_tokens, self.st.context_dim), y_dim, act_dtype, self.trainable)
        if self.semantic is not None:  # VGG activations of the student's x0 preview (about 3 per conv output)
            px = h * w
            vgg = (64 * 2 * px + 128 * 2 * px / 4 + 256 * 3 * px / 16) * 3 * 4
            for k in list(prof):
                prof[k] += int(vgg)
        mode = True if cfg.gradient_checkpointing else ("selective" if cfg.selective_recompute else False)
        ema = self.trainable_params * 4 if cfg.ema_decay > 0 else 0
        ema_host = bool(ema and cfg.ema_on_host and self.device.type != "cpu")
        est = MemoryEstimate(
            student_weights=student_w, teacher_weights=teacher_w, grads=self.trainable_params * 4,
            optimizer=self.trainable_params * 8, ema=0 if ema_host else ema,
            autocast_copies=self.trainable_params * itemsize if self.autocast is not None else 0,
            activations=prof[mode] * cfg.batch_size,
            workspace=prof[("work", mode)] * cfg.batch_size, batch_size=cfg.batch_size,
            latent_hw=(int(h), int(w)), checkpointing=cfg.gradient_checkpointing,
            trainable_params=self.trainable_params, per_sample_activations=prof,
            selective=mode == "selective", accumulating=cfg.grad_accum > 1, host=2 * ema if ema_host else 0)
        self._estimates[teacher_resident] = est
        return est

    def check_memory(self, free_bytes: int | None = None, *, teacher_resident: bool = False,
                     extra_fixes: list[str] | None = None, headroom: float = 0.9, processes: int | None = None,
                     where: str | None = None, options: dict[str, str] | None = None) -> MemoryEstimate:
        """Raise :class:`TrainingMemoryError` (with the figures and the fix) if the run cannot fit.

        ``free_bytes`` (with ``where``, what that figure is): by default the process's own GPU's free memory, or
        on the CPU the RAM the process's cgroup (container) leaves (``resources.free_memory``). On the CPU the
        ``processes`` of this run on this machine (default: torchrun's ``LOCAL_WORLD_SIZE``) share that RAM,
        so all of them together must fit; each GPU process has its own device. ``options``: how the caller
        names the memory options it offers (``{"selective_recompute": "--selective-recompute", "ema_on_host":
        ...}``), suggested with their figures when they would help."""
        est = self.estimate_memory(teacher_resident=teacher_resident)
        if free_bytes is None:
            free, where = resources.free_memory(self.device)
        else:
            free, where = int(free_bytes), where or f"free on {self.device}"
        n = 1 if self.device.type == "cuda" else (processes or resources.local_processes())
        extra = self.best_copy_bytes() if self.device.type == "cpu" else 0  # on a GPU it is host RAM
        if (est.total + extra) * n <= free * headroom:
            return est
        fixes = []
        options = options or {}
        if not est.checkpointing and not est.selective and "selective_recompute" in options:
            alt = est.with_(selective=True)
            fixes.append(f"{options['selective_recompute']} (the same loss and weights, a few per cent slower; "
                         f"~{alt.total / GIB:.2f} GiB)")
        if not est.checkpointing:
            alt = est.with_(checkpointing=True)
            fixes.append(f"turn on gradient_checkpointing (~{alt.total / GIB:.2f} GiB)")
        if est.ema and self.device.type != "cpu" and "ema_on_host" in options:
            alt = est.with_(ema_on_host=True)
            fixes.append(f"{options['ema_on_host']} (the EMA in host memory: ~{alt.total / GIB:.2f} GiB on the "
                         "device)")
        for b in range(est.batch_size - 1, 0, -1):
            alt = est.with_(batch_size=b)
            if (alt.total + extra) * n <= free * headroom or b == 1:
                acc = math.ceil(est.batch_size * self.cfg.grad_accum / b)
                fixes.append(f"batch_size {b} with gradient_accumulation {acc} (same samples per step, "
                             f"~{alt.total / GIB:.2f} GiB)")
                break
        fixes += list(extra_fixes or [])
        if n > 1:
            fixes.append(f"fewer processes on this machine than {n}")
        fixes.append("a smaller latent size (images), a GPU with more memory, or a higher memory limit for the "
                     "container" if self.device.type == "cpu" else "a smaller latent size (images) or a GPU with "
                     "more memory")
        need = est.describe() + (f" + the best evaluation's weights {extra / GIB:.2f} GiB" if extra else "")
        if n > 1:
            need += f" per process, x {n} processes on this machine = {(est.total + extra) * n / GIB:.2f} GiB"
        raise TrainingMemoryError(
            f"distillation needs {need}; {free / GIB:.2f} GiB is {where}", "; or ".join(fixes), estimate=est,
            free_bytes=free, node=self.node, input_name="batch_size")

    # ---- setup ----------------------------------------------------------------------------------
    def _trainable_copy(self) -> torch.nn.Module:
        """The student copied onto the device: trainable parameters fp32, frozen ones in the compute dtype."""
        frozen_dtype = self.autocast or torch.float32
        memo = {}
        for name, p in self.student.named_parameters():
            train = self.trainable(name)
            dt = torch.float32 if train or not p.is_floating_point() else frozen_dtype
            memo[id(p)] = torch.nn.Parameter(p.detach().to(self.device, dt, copy=True), requires_grad=train)
        for b in self.student.buffers():
            memo[id(b)] = b.detach().to(self.device, copy=True)
        model = copy.deepcopy(self.student, memo)
        for m in model.modules():  # ComfyUI lowvram casting / weight patches / dynamic VRAM: weights are plain here
            if getattr(m, "comfy_cast_weights", False):
                m.comfy_cast_weights = False
            for attr in ("weight_function", "bias_function"):
                if isinstance(getattr(m, attr, None), list):
                    setattr(m, attr, [])
        model.train()
        return model

    def _opts(self, teacher: bool) -> dict:
        opts = dict(self.teacher_opts) if teacher else {}
        if self.cfg.attention == "sdpa":
            opts["optimized_attention_override"] = sdpa_attention
        return opts

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _teacher_dtype(self) -> torch.dtype:
        """The dtype the teacher computes in (its inputs are cast to it, as ComfyUI's apply_model does)."""
        if self._t_dtype is not None:
            return self._t_dtype
        for p in self.teacher.parameters():
            if p.is_floating_point() and p.element_size() >= 2:
                return p.dtype
        return torch.float32

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Host data onto the device (pinned and asynchronous on CUDA): the only host-to-device traffic."""
        if t is None:
            return None
        if self.device.type == "cuda":
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def _run_teacher(self, nb: NoisedBatch, ctx, y):
        dt = self._teacher_dtype()
        if self.autocast is not None and dt in (torch.float16, torch.bfloat16):  # compute in its own half dtype
            amp = torch.autocast(self.device.type, dtype=dt)
        else:
            amp = self._autocast()
        with torch.no_grad(), amp:
            out = self.teacher(nb.x_in.to(dt), nb.timesteps, context=ctx.to(dt),
                               y=None if y is None else y.to(dt), transformer_options=self._opts(True))
        return out.float()

    def _run_student(self, model, nb: NoisedBatch, ctx, y):
        with self._autocast():
            out = model(nb.x_in, nb.timesteps, context=ctx, y=y, transformer_options=self._opts(False))
        return out.float()

    # ---- sampling order -------------------------------------------------------------------------
    def draw(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample indices, timesteps, noise) of this process's share of micro-batch ``micro`` of step ``step``
        (CPU tensors)."""
        return draw_batch(self.cfg.seed, step, micro, batch_size=self.cfg.batch_size, grad_accum=self.cfg.grad_accum,
                          num_timesteps=self.schedule.num_timesteps, rank=self.rank, world_size=self.world_size,
                          buckets=self._buckets, order=self._order)

    def host_batch(self, step: int, micro: int):
        """A micro-batch on the host: (x0, noise, timesteps, context, y) CPU tensors, pinned when the device is
        CUDA. What the prefetch thread prepares while the steps before run."""
        idx, t, noise = self.draw(step, micro)
        x0, ctx, y = self.data.batch(idx)
        out = (x0, noise, t, ctx, y)
        if self.device.type == "cuda":
            out = tuple(None if v is None else v.pin_memory() for v in out)
        return out

    def micro_batch(self, step: int, micro: int):
        """(noised batch, context, y) of a micro-batch, on the device. The time it waits for the host batch
        (read ahead by the prefetch thread, or read here) and for its copies to be queued counts as data wait."""
        t0 = time.perf_counter()
        feed = self._feed
        x0, noise, t, ctx, y = feed.get(step, micro) if feed is not None else self.host_batch(step, micro)
        x0, noise, ctx, y = (self._to_device(v) for v in (x0, noise, ctx, y))
        self._wait += time.perf_counter() - t0
        return self.schedule.noised(x0, noise, t), ctx, y

    # ---- held-out error -------------------------------------------------------------------------
    def _heldout_batches(self):
        """Fixed (x_in, timesteps, ctx, y, teacher output) batches: each held-out sample at
        ``heldout_timesteps`` stratified timesteps with fixed noise. Each (sample, stratum) draws its timestep and
        noise from its own generator, seeded by the pair alone: the same whatever the batch size, the number of
        processes or the run's seed, so every run on the same held-out samples is measured on the same inputs."""
        if self.heldout is None or len(self.heldout) == 0:
            return []
        k, T = self.cfg.heldout_timesteps, self.schedule.num_timesteps
        batches = []
        order = [(i, j) for j in range(k) for _, ix in self.heldout.buckets() for i in ix]
        shape_of = {i: shape for shape, ix in self.heldout.buckets() for i in ix}
        for s in range(0, len(order), self.cfg.batch_size):
            chunk = order[s:s + self.cfg.batch_size]
            by_shape: dict = {}
            for i, j in chunk:  # a chunk never mixes latent sizes
                by_shape.setdefault(shape_of[i], []).append((i, j))
            for part in by_shape.values():
                idx = torch.tensor([i for i, _ in part])
                x0, ctx, y = self.heldout.batch(idx)
                gens = [step_generator(0, "heldout", i, j) for i, j in part]
                t = torch.tensor([min(T - 1, int((j + float(torch.rand((), generator=g))) * T / k))
                                  for (_, j), g in zip(part, gens)])
                noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens])
                x0, noise, ctx, y = (self._to_device(v) for v in (x0, noise, ctx, y))
                nb = self.schedule.noised(x0, noise, t)
                batches.append((nb, ctx, y, self._run_teacher(nb, ctx, y)))
        return batches

    def _heldout_error(self, model) -> float:
        if not self._held:
            return float("nan")
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        with torch.no_grad():
            for nb, ctx, y, t_out in self._held:
                s_out = self._run_student(model, nb, ctx, y)
                total += F.mse_loss(s_out, t_out, reduction="sum").double()
                count += t_out.numel()
        return float(total) / count

    # ---- the run --------------------------------------------------------------------------------
    def run(self, *, progress: Callable[[int, int, float], None] | None = None,
            cancel: Callable[[], bool] | None = None, resume: str | None = None,
            on_step: Callable[[int, dict[str, float], bool], None] | None = None,
            allow_changed_data: bool = False) -> TrainResult:
        """Train. ``cancel()`` is called before every step: True stops after the last finished step (the
        result is returned, a checkpoint written when checkpointing is on); an exception it raises is
        re-raised after that checkpoint. ``progress(step, total, loss)`` is called after every step, and
        ``on_step(step, terms, applied)`` with the step's loss terms (``loss`` included, averaged over processes)
        and whether it was applied (False: skipped, non-finite). A checkpoint at ``steps`` resumes into the result.

        Several steps in a row with a non-finite loss or gradient raise :class:`NonFiniteError` (with the last
        good weights and a checkpoint of them); a step with one alone is skipped (no update).

        Evaluation (``eval_hook``): before the first step (not on resume), every ``eval_schedule.every`` steps
        and after the last step. A checkpoint whose training data have changed since is refused, naming what
        changed, unless ``allow_changed_data``."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(progress, cancel, resume, on_step, allow_changed_data)

    def _save(self, model, step: int) -> str | None:
        """A checkpoint at ``step``, written by rank 0 (the others wait for it); its path on rank 0."""
        S.ema_join(self)  # a host EMA update in flight lands first
        path = checkpoints.write(self, model, step) if distributed.is_writer() else None
        self._last_saved = step
        distributed.barrier()
        return path

    def _setup(self, model):
        cfg = self.cfg
        named = dict(model.named_parameters())  # once: per name it walks every module
        self._params = [named[n] for n in self.train_names]
        self._opt = torch.optim.AdamW(self._params, lr=cfg.learning_rate, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                                      fused=True if self.device.type == "cuda" else None)
        self._scaler = torch.amp.GradScaler(self.device.type) if self.autocast == torch.float16 else None
        host = cfg.ema_on_host and self.device.type != "cpu"
        self._ema = {n: (p.detach().to("cpu", copy=True) if host else p.detach().clone())
                     for n, p in zip(self.train_names, self._params)} if cfg.ema_decay > 0 else None
        self._ema_updates = 0
        self._ema_seen = 0  # the applied steps the EMA holds (ema_every > 1: fewer than _ema_updates)
        self._ema_job = None
        self._params_copying = None
        thread = self.ema_thread if self.ema_thread is not None else self.device.type == "cuda"
        self._ema_async = bool(self._ema is not None and cfg.ema_on_host and thread)
        if self._ema_async:
            from concurrent.futures import ThreadPoolExecutor

            pin = self.device.type == "cuda"
            self._ema_staging = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in self._params]
            self._ema_stream = torch.cuda.Stream(self.device) if pin else None
            self._ema_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distilled_unets ema")
        self._losses: list[float] = []
        self._parts: dict[str, list[float]] = {}
        self._evals = []
        self._best = None
        self._raw_after = float("nan")
        self._skipped: list[int] = []
        self._heldout_before = float("nan")
        self._last_saved = -1
        self._wait = 0.0
        self.data_waits = []
        if self.semantic is not None:
            self.semantic = self.semantic.to(self.device)

    def _run(self, progress, cancel, resume, on_step=None, allow_changed_data=False) -> TrainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        model = self._trainable_copy()
        ckpt_handle = enable_gradient_checkpointing(model, selective=not cfg.gradient_checkpointing) \
            if cfg.gradient_checkpointing or cfg.selective_recompute else None
        self._t_taps = Taps(self.teacher, {p.name: p.teacher for p in self.plan.points})
        self._s_taps = Taps(model, {p.name: p.student for p in self.plan.points})
        forward = distributed.wrap(model, self.device)
        self._setup(model)
        written: list[str | None] = []
        notes: list[str] = []
        cancelled = False
        start = 0
        streak: list[int] = []
        phases = {"setup": 0.0, "first_step": 0.0, "steps": 0.0}
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            self._held = self._heldout_batches() if self._kd_eval and distributed.is_writer() else []
            if resume:
                try:
                    start, notes = checkpoints.restore(self, model, resume, allow_changed_data=allow_changed_data)
                except DistillError as e:  # the checkpoint is the node's resume_from input
                    e.node = e.node or self.node
                    e.input_name = e.input_name or "resume_from"
                    raise
                self._restore_best()
                self._ema_seen = self._ema_updates - self._ema_updates % cfg.ema_every  # what a checkpoint holds
            else:
                first = self._evaluate(model, 0)
                if first is not None and HELDOUT_KD in first:
                    self._heldout_before = first[HELDOUT_KD]
            if self.prefetch:
                self._feed = Prefetcher(self.host_batch, ((s, m) for s in range(start, cfg.steps)
                                                          for m in range(cfg.grad_accum)), self.prefetch)
            phases["setup"] = time.perf_counter() - t0
            t_steps = time.perf_counter()
            for step in range(start, cfg.steps):
                if cancel is not None:
                    err = None
                    try:
                        stop = bool(cancel())
                    except BaseException as e:  # Cancel in ComfyUI, Ctrl-C in the trainer: checkpoint, then raise
                        stop, err = True, e
                    if distributed.any_rank(stop, self.device):  # every process stops at the same step
                        if cfg.checkpoint_dir and len(self._losses) > start and self._last_saved != len(self._losses):
                            written.append(self._save(model, len(self._losses)))
                        if err is not None:
                            raise err
                        cancelled = True
                        break
                self._wait = 0.0
                parts, finite = S.train_step(self, model, forward, step)
                self.data_waits.append(self._wait)
                self._losses.append(parts["loss"])
                for k, v in parts.items():
                    if k != "loss":
                        self._parts.setdefault(k, []).append(v)
                done = step + 1
                if step == start:
                    phases["first_step"] = time.perf_counter() - t_steps
                if not finite:
                    self._skipped.append(step)
                    streak.append(step)
                    log.warning("distillation step %d: non-finite loss or gradient (%s); step skipped", step,
                                ", ".join(f"{k} {v:.4g}" for k, v in parts.items()))
                    if len(streak) >= cfg.max_nonfinite_steps:
                        self._stop_nonfinite(model, streak, written, start, t0, notes)
                else:
                    streak = []
                if done < cfg.steps and self.eval_schedule.due(done, cfg.steps):
                    self._evaluate(model, done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    written.append(self._save(model, done))
                if on_step is not None:
                    on_step(done, parts, finite)
                if progress is not None:
                    progress(done, cfg.steps, parts["loss"])
            phases["steps"] = time.perf_counter() - t_steps
            phases["data_wait"] = sum(self.data_waits)
            result = self._finish(model, start, cancelled, [p for p in written if p], notes, t0, phases)
        finally:
            if self._feed is not None:
                self._feed.close()
                self._feed = None
            if getattr(self, "_ema_async", False):
                try:
                    S.ema_join(self)
                finally:
                    self._ema_pool.shutdown(wait=True)
                    self._ema_async, self._ema_staging, self._params_copying = False, None, None
            self._t_taps.remove()
            self._s_taps.remove()
            if ckpt_handle is not None:
                ckpt_handle.remove()
            if was_training:
                self.teacher.train()
            self._held = []
            self._opt = None
            self._ema = None
            del model, forward
        return result

    def _stop_nonfinite(self, model, streak, written, start, t0, notes):
        cfg = self.cfg
        path = self._save(model, len(self._losses)) if cfg.checkpoint_dir else None
        written.append(path)
        # the last good weights as they are (not evaluated again)
        result = self._finish(model, start, False, [p for p in written if p], notes, t0, {}, ema=False)
        where = f"; the last good weights are in {path}" if path else \
            " (no checkpoint folder: set checkpoint_every to keep the last good weights on disk)"
        raise NonFiniteError(
            f"steps {streak[0]}-{streak[-1]} ({len(streak)} in a row) had a non-finite loss or gradient; the run "
            f"stopped at step {len(self._losses)} of {cfg.steps}{where}",
            "check the data for NaN/inf (a bad shard), lower learning_rate, or use bf16/fp32 precision instead "
            "of fp16", step=streak[0], checkpoint=path, result=result, node=self.node, input_name="learning_rate")

    def _finish(self, model, start, cancelled, written, notes, t0, phases, *, ema: bool = True) -> TrainResult:
        cfg = self.cfg
        done = len(self._losses)
        final = self._evaluate(model, done, raw_too=True) if ema and not cancelled else None
        after = final.get(HELDOUT_KD, float("nan")) if final else float("nan")
        after_raw = self._raw_after if self._ema is not None and math.isfinite(self._raw_after) else after
        if self._ema is not None and ema:
            S.ema_catch_up(self)  # ema_every > 1: the steps after the last update
            S.ema_join(self)
            with torch.no_grad():
                named = dict(model.named_parameters())
                for n in self.train_names:
                    named[n].copy_(self._ema[n])
        measured = final is not None and HELDOUT_KD in final
        S.check_weights_finite(self, model)
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        seconds = time.perf_counter() - t0
        samples = (done - start) * cfg.batch_size * cfg.grad_accum * self.world_size
        report = self._report(done, start, samples, seconds, after if measured else None, after_raw, cancelled,
                              written, notes, phases)
        if not measured:
            after = after_raw = float("nan")
        curve = [(e["step"], e[HELDOUT_KD]) for e in self._evals if HELDOUT_KD in e]
        return TrainResult(state, list(self._losses), {k: list(v) for k, v in self._parts.items()},
                           self._heldout_before, after, after_raw, curve, done, samples, seconds,
                           [p for p in written if os.path.exists(p)], cancelled, start, report, list(self._skipped),
                           dict(phases), self.world_size, [dict(e) for e in self._evals],
                           dict(self._best) if self._best else None)

    def _eval_lines(self) -> list[str]:
        """The evaluations in the report: each metric's first and last value (and how many), the best."""
        if not self._evals:
            return []
        names = [k for k in self._evals[-1] if k != "step"]
        first, last = self._evals[0], self._evals[-1]
        lines = [f"evaluations: {len(self._evals)} (steps {', '.join(str(e['step']) for e in self._evals[:8])}"
                 + (" ..." if len(self._evals) > 8 else "") + "); "
                 + "; ".join(f"{k} {first.get(k, float('nan')):.5g} -> {last[k]:.5g}" for k in names)]
        if self._best:
            b = self._best
            lines.append(f"best {b['metric']}: {b['value']:.5g} at step {b['step']}")
        return lines

    def _report(self, done, start, samples, seconds, after, after_raw, cancelled, checkpoints_, notes,
                phases) -> list[str]:
        cfg = self.cfg
        scale = f" x {self.world_size} processes" if self.world_size > 1 else ""
        lines = [f"distilled {done} of {cfg.steps} steps" + (" (cancelled)" if cancelled else "")
                 + (f", resumed at step {start}" if start else "")
                 + f": {samples} samples seen in this run, {seconds:.1f} s"
                 + (f" ({seconds / max(1, done - start):.2f} s/step)" if done > start else ""),
                 f"batch {cfg.batch_size}{scale} x accumulation {cfg.grad_accum}, lr {cfg.learning_rate:g} (AdamW, "
                 f"weight decay {cfg.weight_decay:g}, grad-norm clip {cfg.grad_clip:g}), loss weights: "
                 f"{cfg.weights.describe()}",
                 f"trains {self.trainable_params:,} of {sum(p.numel() for p in self.student.parameters()):,} "
                 f"student parameters on {self.device}"]
        if phases:
            steady = done - start - 1
            rest = f", then {(phases['steps'] - phases['first_step']) / steady:.3f} s/step" if steady > 0 else ""
            lines.append(f"time: setup {phases['setup']:.1f} s (copy to the device, held-out teacher passes), first "
                         f"step {phases['first_step']:.2f} s{rest}")
            if "data_wait" in phases and phases["steps"] > 0:
                ahead = f"read {self.prefetch} micro-batch(es) ahead by a background thread" if self.prefetch \
                    else "read in the step loop (no prefetch)"
                lines.append(f"data: the steps waited {phases['data_wait']:.2f} s for their data "
                             f"({100 * phases['data_wait'] / phases['steps']:.2g} % of the steps' time; {ahead})")
        if after is not None:
            ema = f" (EMA weights; raw weights {after_raw:.5f})" if cfg.ema_decay > 0 else ""
            lines.append(f"held-out output-KD error (MSE student vs teacher output): {self._heldout_before:.5f} "
                         f"-> {after:.5f}{ema}")
        elif not self.evaluates:
            lines.append("no held-out samples: held-out error not measured")
        lines += self._eval_lines()
        if self._losses:
            lines.append(f"training loss: first {self._losses[0]:.5f}, last {self._losses[-1]:.5f}")
        if self._skipped:
            lines.append(f"skipped {len(self._skipped)} step(s) with a non-finite loss or gradient: "
                         + ", ".join(str(s) for s in self._skipped[:10]) + (" ..." if len(self._skipped) > 10 else ""))
        lines += self.plan.report_lines()
        if checkpoints_:
            kept = [c for c in checkpoints_ if os.path.exists(c)]
            gone = len(checkpoints_) - len(kept)
            lines.append(f"checkpoints: {', '.join(os.path.basename(c) for c in kept) or 'none kept'}"
                         + (f" ({gone} older deleted: keep_checkpoints {cfg.keep_checkpoints})" if gone else ""))
        lines += notes
        return lines
