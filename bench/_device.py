"""Device, dtype and peak-memory helpers shared by the benches.

Whatever device is there: CUDA with fp16 when a GPU is visible, the CPU in fp32 otherwise;
``BENCH_DEVICE`` (``cpu`` / ``cuda`` / ``cuda:1``) and ``BENCH_DTYPE`` (``fp32`` / ``fp16`` / ``bf16``)
override. ``setup()`` exports ``BENCH_DEVICE`` so that ``_pack.setup_comfy()`` (called after it) puts
ComfyUI on the same device. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
resident set on the CPU (polled, since torch's CPU allocator has no counter); :class:`PeakAllocated` counts the
live tensor bytes on the CPU too (from the profiler's allocation events), the CPU's counterpart of the GPU figure.

The lines run_all.py reads back (every bench prints both, the phase line once at the end, before the
peak line)::

    bench phases: setup 12.3 s, measure 45.6 s        <- phase_line(setup_s, measure_s)
    bench peak memory: 5123 MiB (...)                 <- peak_line(device)

``setup`` is everything before the clock (imports, building and seeding models on their device,
writing files, warm-up runs); ``measure`` the timed rounds and what sits between them. A bench that
alternates (one model after another) adds both up, e.g. with :class:`Phases`. run_all.py parses the
phase line with :func:`parse_phase_line` into its summary table's ``setup s`` / ``measure s`` columns.

Timing helpers for the tables: :func:`clock_for` (wall time on a GPU, the process's CPU time on a shared CPU),
:func:`ms3` / :func:`sig3` (three significant figures; milliseconds are the tables' unit), :func:`spread`
((median - best) / best) and :func:`steady_rounds` (keep adding interleaved rounds, up to a bound, until every
row's spread is at most 5 %). Full-size random UNets built
and drawn on the device they run on (never on the CPU of a GPU run): ``_pack.random_unet`` (ComfyUI's own
model of a Topology), ``_pack.random_state_dict`` and ``_pack.randomize``. :func:`peak_tflops`: the card's
bf16 dense peak, for a model FLOP utilisation.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import statistics
import threading
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the line every bench ends with; run_all.py reads it back for its summary
PEAK_PREFIX = "bench peak memory:"
# the line every bench prints before it: seconds spent setting up and measuring (run_all.py reads it back)
PHASE_PREFIX = "bench phases:"
SPREAD_GOAL = 0.05  # a row whose spread is above this gets more rounds (steady_rounds)


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


class PeakAllocated:
    """``with PeakAllocated(device) as pm: ...`` then ``pm.mib``: the peak of the bytes held by live tensors above
    the level at entry, in MiB: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the same count from the
    profiler's allocation events (torch's CPU allocator keeps no counter), which costs time: measure time apart."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mib = float("nan")

    def __enter__(self):
        if is_cuda(self.device):
            self._inner = PeakMemory(self.device)
            self._inner.__enter__()
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if is_cuda(self.device):
            self._inner.__exit__(*exc)
            self.mib = self._inner.mib
            return False
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        now = peak = 0
        for _, n in events:
            now += n
            peak = max(peak, now)
        self.mib = peak / 2 ** 20
        self._prof = None
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


# ------------------------------------------------------------------------------------------------
# phases and timing


def phase_line(setup_s: float, measure_s: float) -> str:
    """``bench phases: setup 12.3 s, measure 45.6 s``: print it once, at the end, before ``peak_line``."""
    return f"{PHASE_PREFIX} setup {setup_s:.1f} s, measure {measure_s:.1f} s"


_PHASES = re.compile(re.escape(PHASE_PREFIX) + r" setup ([0-9.]+) s, measure ([0-9.]+) s")


def parse_phase_line(line: str) -> tuple[float, float] | None:
    """(setup s, measure s) of a :func:`phase_line`, or None for any other line."""
    m = _PHASES.match(line.strip())
    return (float(m.group(1)), float(m.group(2))) if m else None


def process_start() -> float:
    """``time.perf_counter()`` of the moment this process started (so the interpreter's and torch's imports
    count as setup); now, where psutil cannot tell."""
    now, wall = time.perf_counter(), time.time()
    try:
        import psutil

        return now - max(0.0, wall - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - no psutil: the clock starts at the first Phases()
        return now


class Phases:
    """Seconds spent setting up and measuring, summed over as many stretches as a bench has::

        ph = Phases()            # setup counts from the process's start (imports included)
        ... build ...
        ph.measuring()           # setup stops, measure starts
        ... timed rounds ...
        ph.setting_up()          # back to setup (the next model), and so on
        print(ph.line())         # stops the clock: phase_line(setup, measure)
    """

    def __init__(self, start: float | None = None):
        self.setup_s = 0.0
        self.measure_s = 0.0
        self._phase = "setup"
        self._t = process_start() if start is None else start

    def _switch(self, to: str) -> None:
        now = time.perf_counter()
        if self._phase == "setup":
            self.setup_s += now - self._t
        else:
            self.measure_s += now - self._t
        self._phase, self._t = to, now

    def count_as_setup(self, seconds: float) -> None:
        """Move ``seconds`` of the stretch now running into setup (e.g. a worker process's imports and build
        inside a measuring loop)."""
        if self._phase == "setup":
            return
        self.setup_s += seconds
        self.measure_s -= seconds

    def measuring(self) -> None:
        self._switch("measure")

    @contextlib.contextmanager
    def measure(self):
        """``with ph.measure(): ...``: the block counts as measuring, then the phase before it goes on."""
        before = self._phase
        self._switch("measure")
        try:
            yield
        finally:
            self._switch(before)

    def setting_up(self) -> None:
        self._switch("setup")

    def line(self) -> str:
        self._switch(self._phase)
        return phase_line(self.setup_s, self.measure_s)


def drop_page_cache(paths) -> bool:
    """Ask the kernel to drop the files' cached pages (clean after an fsync): their next reads come from the disk.
    False where the OS has no ``posix_fadvise``."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def sig3(x: float) -> str:
    """``x`` to three significant figures, without an exponent (0.0305 -> ``0.0305``, 39261 -> ``39300``)."""
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    decimals = 2 - math.floor(math.log10(abs(x)))
    return f"{x:.{decimals}f}" if decimals >= 0 else f"{round(x, decimals):.0f}"


def ms3(seconds: float) -> str:
    """A time in milliseconds with three significant figures (0.0123 s -> ``12.3``, 1.234 s -> ``1230``)."""
    return sig3(seconds * 1e3)


def clock_for(device):
    """The clock of a timed section: wall time on a GPU (after a sync); on a CPU the process's CPU time, since
    the CPU machines these benches run on are shared and wall time there measures the neighbours (run with
    ``--threads 1``: with more threads, idle worker threads spinning would count too)."""
    return time.perf_counter if is_cuda(device) else time.process_time


def clock_name(device) -> str:
    return "wall time" if is_cuda(device) else "CPU time of the process"


def spread(times) -> float:
    """(median - best) / best of a row's times: 0 when every round took the same time."""
    best = min(times)
    return (statistics.median(times) - best) / best if best > 0 else 0.0


def steady_rounds(fns: dict, rounds: int, max_rounds: int, goal: float = SPREAD_GOAL) -> dict:
    """Interleaved timing rounds: ``fns`` maps a row's name to a callable returning its own seconds
    (it syncs the device itself). Runs ``rounds`` rounds (each calls every row once, in order), then
    one more round at a time while any row's :func:`spread` is above ``goal``, up to ``max_rounds`` in
    all. Returns ``{name: [seconds per round]}``; a row still above ``goal`` shows its spread in the table."""
    times: dict = {k: [] for k in fns}
    for i in range(max(rounds, max_rounds)):
        if i >= rounds and all(spread(v) <= goal for v in times.values()):
            break
        for k, fn in fns.items():
            times[k].append(fn())
    return times


# bf16 dense tensor-core peaks (TFLOP/s) of the cards a model FLOP utilisation is printed for; matched on
# torch.cuda.get_device_name, first match wins (an unknown card: no MFU)
PEAK_TFLOPS_BF16 = (
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), None),  # other clocks and power: not in this table
    (("h100",), 989.0),       # SXM (the name says "HBM3")
    (("h200",), 989.0),
    (("a100",), 312.0),
)


def peak_tflops(device) -> float | None:
    """The card's bf16 dense peak in TFLOP/s from :data:`PEAK_TFLOPS_BF16`, or None (a CPU, an unknown card)."""
    if not is_cuda(device):
        return None
    name = torch.cuda.get_device_name(device).lower()
    for words, peak in PEAK_TFLOPS_BF16:
        if all(w in name for w in words):
            return peak
    return None
