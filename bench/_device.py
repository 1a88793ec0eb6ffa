"""Device, dtype and peak-memory helpers shared by the benches.

Whatever device is there: CUDA with fp16 when a GPU is visible, the CPU in fp32 otherwise;
``BENCH_DEVICE`` (``cpu`` / ``cuda`` / ``cuda:1``) and ``BENCH_DTYPE`` (``fp32`` / ``fp16`` / ``bf16``)
override. ``setup()`` exports ``BENCH_DEVICE`` so that ``_pack.setup_comfy()`` (called after it) puts
ComfyUI on the same device. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
resident set on the CPU (polled, since torch's CPU allocator has no counter).
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the line every bench ends with; run_all.py reads it back for its summary
PEAK_PREFIX = "bench peak memory:"


def pick_device() -> str:
    env = os.environ.get("BENCH_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype_name(device: str) -> str:
    return os.environ.get("BENCH_DTYPE") or ("fp16" if str(device).startswith("cuda") else "fp32")


def setup(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of this bench run; call before ``_pack.setup_comfy()``."""
    dev = device or pick_device()
    os.environ["BENCH_DEVICE"] = dev
    return torch.device(dev), DTYPES[default_dtype_name(dev)]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def describe(device, dtype: torch.dtype) -> str:
    """One line naming the hardware, the dtype and torch, for every table's header."""
    if is_cuda(device):
        name = torch.cuda.get_device_name(device)
        where = f"cuda ({name})"
    else:
        where = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    return f"device {where}, {dtype_name(dtype)}, torch {torch.__version__}"


def cast_unet(patcher, dtype: torch.dtype):
    """A ComfyUI UNet built in fp32 (the test builders) cast to ``dtype`` in place, its declared dtype
    with it (ComfyUI's UNetModel casts its input to ``diffusion_model.dtype``). Returns ``patcher``."""
    dm = patcher.model.diffusion_model
    if dm.dtype != dtype:
        dm.to(dtype)
        dm.dtype = dtype
    return patcher


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.mib``: the peak above the level at entry, in MiB
    (``torch.cuda.max_memory_allocated`` on a GPU; the process RSS polled every 1 ms on the CPU)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mib = float("nan")

    def __enter__(self):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        proc = psutil.Process()
        self._base = proc.memory_info().rss
        self._peak = [self._base]
        self._done = threading.Event()

        def poll():
            while not self._done.is_set():
                self._peak[0] = max(self._peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.mib = max(0, torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        else:
            self._done.set()
            self._thread.join()
            self.mib = max(0, self._peak[0] - self._base) / 2 ** 20
        return False


def peak_mib(fn, device) -> float:
    with PeakMemory(device) as pm:
        fn()
    return pm.mib


def process_peak_mib(device) -> float:
    """Peak of the whole process so far: GPU memory allocated by torch, or the CPU resident set."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_line(device) -> str:
    what = "torch.cuda.max_memory_allocated" if is_cuda(device) else "max RSS of the process"
    return f"{PEAK_PREFIX} {process_peak_mib(device):.0f} MiB ({what}, {torch.device(device)})"
