"""The process side of the command-line tools under ``torch.distributed`` (``tools/distill.py``,
``tools/evaluate.py``): joining the process group ``torchrun`` set up, logging per rank, leaving the group, and
stopping every rank at the same step on a signal. Host-free: torch only."""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from . import distributed

log = logging.getLogger("distilled_unets")


def init_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; the process group is started when there are
    several processes (NCCL on GPUs, gloo on CPUs), each rank on the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        store = _attempt_store(int(os.environ.get("RANK", "0")), world)
        if store is None:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo", store=store,
                                    rank=int(os.environ["RANK"]), world_size=world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def device_missing(device_flag: str) -> str | None:
    """Why ``--device`` cannot be honoured (a line for stderr), or None."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        return "error: --device cuda, but no CUDA device is visible"
    return None


def start(device_flag: str, threads: int = 0, own_logging: bool = True) -> tuple[int, int, torch.device] | None:
    """A tool's process start: (rank, world size, device), or None when ``--device`` cannot be honoured (the
    reason written to stderr: exit 2). ``threads``: torch's CPU threads (0: torch's default); ``own_logging``: the
    pack's log on stderr per rank (:func:`log_to_stderr`), False leaves logging as the caller set it up."""
    why = device_missing(device_flag)
    if why:
        sys.stderr.write(why + "\n")
        return None
    if threads:
        torch.set_num_threads(threads)
    rank, world, device = init_distributed(device_flag)
    if own_logging:
        log_to_stderr(rank, world)
    return rank, world, device


def name_error(e, tool: str, flags: dict[str, str]) -> None:
    """A typed error as a tool reports it: the tool as its node, the input as the tool's flag."""
    e.node = tool
    e.input_name = flags.get(e.input_name, e.input_name)


def end_process_group(ok: bool) -> None:
    """Leave the process group: after a barrier when the run went well (rank 0 may still be writing)."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


class TqdmHandler(logging.Handler):
    """Log lines through tqdm.write, so they do not break a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def log_to_stderr(rank: int, world: int) -> None:
    """The pack's log on stderr (``[rank N]`` before each line under torchrun): rank 0 at INFO, the others only
    warnings and errors; ComfyUI's own INFO lines left out."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter((f"[rank {rank}] " if world > 1 else "") + "%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def _attempt_store(rank: int, world: int):
    """torchrun's store with the keys of this restart apart (``TORCHELASTIC_RESTART_COUNT``), or None outside
    torchrun. After ``--max-restarts`` restarted the workers, the agent's store still holds the previous
    attempt's keys (torch 2.14, where this was written, no longer prefixes them per attempt), and the new process
    group would read the dead ranks' addresses and fail to connect."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=30), multi_tenant=not agent)
    return dist.PrefixStore(f"distilled_unets/attempt_{attempt}", store)


class Stopper:
    """SIGINT / SIGTERM set a flag; the engine's cancel callback (called before every step) agrees on it across
    ranks, so every rank stops at the same step, after the engine wrote a checkpoint. A second signal stops at
    once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self, device: torch.device):
        self.flag = False
        self.signame = ""
        self._device = device if device.type == "cuda" else torch.device("cpu")
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.flag:
            self.uninstall()
            raise KeyboardInterrupt
        self.flag = True
        self.signame = signal.Signals(signum).name
        log.warning("%s: stopping after this step and writing a checkpoint (again: stop now, no checkpoint)",
                    self.signame)

    def __call__(self) -> bool:
        return distributed.any_rank(self.flag, self._device)
