# ruff: noqa: T201  (bench scripts print their tables)
"""Every bench in bench/, one command, on whatever device is there.

    python bench/run_all.py                 # CUDA in fp16 when a GPU is there (within 8 minutes on one H100), else CPU
    python bench/run_all.py --quick         # small settings: proves every bench runs (minutes on a CPU)
    python bench/run_all.py --only gri,multi_unet --markdown out.md

First it checks that ComfyUI and every module the benches and ComfyUI's own imports need are there
(:data:`NEEDS`), and names everything missing in one line before any bench starts (exit status 2).

Each bench runs in its own process (no state leaks between them: ComfyUI's model management, the GRI
bench's attention backend), with the settings of ``BENCHES`` for the device: on a GPU those that fit the
8-minute budget (each bench also has a time limit, and the run stops starting benches once the budget
is spent); on a CPU those of docs/benchmarks.md (about an hour on 2 cores). The tables print as the
benches write them, then one summary: status, seconds, setup and measuring seconds (the
``bench phases:`` line every bench prints, ``_device.phase_line``) and peak memory of each
(``torch.cuda.max_memory_allocated`` on a GPU, max RSS on the CPU), and the seconds of every example
workflow. ``--markdown`` also writes every table with its command, as docs/benchmarks.md holds them.

A new bench (student builder, distillation, CondConv, ...) is one more ``Bench`` entry in ``BENCHES``:
a script in bench/ that prints its table and ends with ``_device.phase_line`` and ``_device.peak_line``.

Also here, each in its own process:

* the dynamic-VRAM check (GPU only; a line says it was skipped on a CPU). ComfyUI 0.33 turns dynamic VRAM
  on by default on NVIDIA (``ModelPatcherDynamic``): a student loaded through the pack is sampled next to
  a teacher from ComfyUI's own loader as one multi-UNet MODEL, dynamic + dynamic and legacy + dynamic,
  against legacy + legacy: steps per UNet, time, peak memory and the difference of the images.
* the example workflows: every ``workflows/*.json`` through the real ComfyUI server on the bench's device
  (``tools/run_workflow.py``'s own functions; demo weights where the models are not installed, so the
  images are noise), seconds per workflow. With ``--quick`` only :data:`QUICK_WORKFLOW`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPU_BUDGET_S = 480  # the whole run on one GPU: 8 minutes
# one line per workflow the workflows check ran: "bench workflow: <file> <seconds> s <status>"
WORKFLOW_PREFIX = "bench workflow:"
QUICK_WORKFLOW = "distilled_unet_sd15.json"  # the smallest: a student loaded and sampled


@dataclass(frozen=True)
class Bench:
    """One bench: ``script`` in bench/ with ``args[profile]`` (profiles: "cuda", "cpu", "quick")."""
    name: str
    title: str                 # the docs/benchmarks.md section its table belongs to
    script: str
    args: dict = field(default_factory=dict)
    gpu_limit_s: int = 120     # time limit of this bench inside the GPU budget
    device_free: bool = False  # never touches the GPU: on a GPU machine it runs beside the GPU benches

    def argv(self, profile: str) -> list[str]:
        return [sys.executable, str(HERE / self.script)] + list(self.args.get(profile, self.args.get("cpu", [])))


# The GPU limits (gpu_limit_s): measured time on one H100 + 30 %, where a bench ran there; else the CPU
# phases of `run_all.py --quick` (docs/benchmarks.md) turned into H100 seconds with the H100
# figures. Fixed cost of a bench process on that machine: ~9 s (multi_unet alone took 38 s = imports and
# CUDA start + 2 x 8 s of CPU drawing + 13 s sampling); one SD1.5 UNet call at 512 px, batch 2, fp16:
# 30 ms (0.60 s per 20 CFG steps); building a UNet on the device costs its module construction (0.1-0.3 s
# on the CPU on `meta`, the same work) and milliseconds of drawing. Per bench:
# * multi_unet 50: 38 s alone on the H100 (its owner moves the drawing to the device: less).
# * gri 70: ran within it on the H100.
# * condconv 45: ran within 40 s on the H100 at batch 1/2 in fp16; now fp16 and bf16 at batch 1/2/4/8 (its
#   defaults on CUDA), rounds 3-12 of a ~5-40 ms step pair and the conv passes: ~+5 s.
# * dynamic_vram 40: 9 s + 2 s drawing two UNets on the GPU and moving them to RAM (a file's worth) +
#   3 cases x (~3 s loading, 2 warm-up steps, 2-4 rounds x 20 steps x ~30 ms) ~= 30 s.
# * builder 40: 9 s + 17 UNets built on the device (~5 s) + 14 presets x (3-9 rounds x 2 calls at
#   batch 1, 20-40 ms) <= 10 s + first-call autotuning ~5 s ~= 29 s.
# * distill 85: 9 s + 2 s diffusers + ~10 s building SD1.5/bk-small and SDXL/Vega on the device; 12
#   bk-small variants (batch 1/4/8 x checkpointing off/on x pack/diffusers) x (0.5 s meta estimate +
#   0.3 s copies + 6 steps x 50-90 ms) ~= 16 s, 24 s with a spread round; 4 Vega variants at 1024 px
#   (batch 1/2) x (1 s + 6 steps x 60-120 ms) ~= 7 s, 12 s with a round; ~= 65 s.
# * loader 55: 9 s + 13 models x (draw on the device, 11 G parameters in all moved to RAM as a file's
#   worth ~3 s, both builds ~10 s, loads ~4 s) + 13 x 2 builds x (2 warm-up + 3-9 rounds) x 30-80 ms
#   <= 14 s ~= 40 s.
# * workflows 85: the server's start ~15 s (demo weights written beside the GPU benches, on the CPU,
#   from the run's start), 7 workflows at 4 steps and 128 px; on 2 loaded CPU cores they took 48 s
#   (build_student_sd15: loads the 1.9 GB teacher checkpoint, copies and hashes its weights on the CPU
#   whatever the device), 19 s (multi_unet_sdxl: 1.9 GB checkpoint with a full CLIP-G), 1-4 s each
#   for the rest; on the GPU host's faster CPU with the sampling on the GPU ~= 40 s; distill_student_sd15
#   (the same build + 4 steps) ~= 10 s; ~= 58 s; an eighth, distill_from_dataset_sd15 (4 images encoded,
#   a dataset saved and loaded, 4 steps), ~= 10 s more.
# Sum 470 s of the 480 s budget; lora_coverage, distill_scale and data_wait run on the CPU beside them.
BENCHES = [
    Bench("multi_unet", "Multi-UNet sampling (A-SDM): tiny-sd early, SD1.5 late", "bench_multi_unet.py", {
        # eager rows only in the 8-minute run (inductor's compile alone takes 1-2.5 min): the compiled
        # table is `bench_multi_unet.py --channels 320 --size 64 --steps 20` on its own
        "cuda": ["--channels", "320", "--size", "64", "--steps", "20", "--reps", "5", "--max-rounds", "10",
                 "--compile", "none"],
        "cpu": ["--channels", "320", "--size", "32", "--steps", "10", "--reps", "4", "--threads", "2"],
        "quick": ["--channels", "32", "--size", "8", "--steps", "4", "--reps", "1"],
    }, gpu_limit_s=50),
    Bench("gri", "GRI attention vs exact attention vs ComfyUI's HyperTile at equal window", "bench_gri.py", {
        "cuda": ["--reps", "3", "--sizes", "512,1024,2048", "--unet-sizes", "1024,2048"],  # 2048 px: the goal
        "cpu": ["--threads", "2", "--reps", "3", "--unet-sizes", "512,1024", "--cpu-default-exact"],
        "quick": ["--sizes", "256", "--unet-sizes", "256", "--reps", "1", "--unet-models", "tiny-sd"],
    }, gpu_limit_s=70),
    Bench("dynamic_vram", "Dynamic VRAM (ComfyUI's ModelPatcherDynamic): pack student + ComfyUI teacher",
          "run_all.py", {
              "cuda": ["--check", "dynamic_vram"],
              "cpu": ["--check", "dynamic_vram"],
              "quick": ["--check", "dynamic_vram", "--quick"],
          }, gpu_limit_s=40),
    Bench("builder", "Student builder: every preset vs its teacher", "bench_builder.py", {
        "cuda": ["--families", "sd1,sd2,sdxl", "--rounds", "3", "--warmup", "2"],
        "cpu": ["--px-sd", "256", "--px-sdxl", "512", "--rounds", "3", "--threads", "1"],
        "quick": ["--families", "sd1", "--presets", "bk-small,asdm-m2", "--px-sd", "64", "--rounds", "1",
                  "--threads", "1"],
    }, gpu_limit_s=40),
    Bench("distill", "Distillation: one KD training step, the pack vs BK-SDM's step on diffusers", "bench_distill.py", {
        "cuda": ["--preset", "bk-small,vega", "--batch", "1,4,8", "--sdxl-batch", "1,2", "--checkpointing", "off,on",
                 "--sdxl-checkpointing", "off", "--steps", "4", "--warmup", "2", "--reps", "1", "--max-reps", "2"],
        "cpu": ["--threads", "1", "--reps", "2", "--max-reps", "3", "--steps", "4", "--warmup", "1"],
        "quick": ["--threads", "1", "--reps", "1", "--steps", "1", "--warmup", "1", "--checkpointing", "off",
                  "--in-process"],
    }, gpu_limit_s=85),
    Bench("condconv", "CondConv (A-SDM CLME): per-step cost of a tiny-sd student, with and without",
          "bench_condconv.py", {
        "cuda": ["--device", "cuda", "--batches", "1,2,4,8"],
        "cpu": ["--size", "32", "--reps", "3", "--conv-reps", "1", "--threads", "1"],
        "quick": ["--channels", "32", "--size", "16", "--batches", "1,2", "--reps", "1", "--conv-reps", "1"],
    }, gpu_limit_s=45),
    Bench("distill_scale", "Distillation at scale: samples/s at 1 vs 2 processes (CPU), per-GPU rate of bk-small at "
          "512 px", "bench_distill_scale.py", {
        # on a GPU machine its CPU part runs beside the GPU benches (the per-GPU rate of one process is
        # bench_distill's samples/s column; `bench_distill_scale.py --parts gpu` alone measures it under DDP)
        "cuda": ["--parts", "cpu", "--reps", "2"],
        "cpu": ["--parts", "cpu", "--reps", "3"],
        "quick": ["--parts", "cpu", "--reps", "1", "--steps", "3", "--batch", "4"],
    }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
    Bench("dataset_digest", "Distillation data identity: hashing the shards' content once vs reading them",
          "bench_dataset_digest.py", {
              # CPU and disk only: on a GPU machine it runs beside the GPU benches
              "cuda": ["--size-gb", "2", "--shard-mb", "128"],
              "cpu": ["--size-gb", "2", "--shard-mb", "128"],
              "quick": ["--size-gb", "0.1", "--shard-mb", "16"],
          }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
    Bench("data_wait", "Distillation data: the step's wait for a dataset streamed from disk, before and after",
          "bench_data_wait.py", {
        # on a GPU machine it runs on the CPU beside the GPU benches (the budget has no room left for it): the GPU
        # figure is `BENCH_DEVICE=cuda python bench/bench_data_wait.py --width 320 --size 64 --checkpointing
        # --samples 2100 --steps 3` alone (full-width bk-small at 512 px, batch 64: ~45 s on an H100, estimated)
        "cuda": ["--device", "cpu", "--threads", "2"],
        "cpu": ["--threads", "1"],
        "quick": ["--width", "32", "--size", "8", "--samples", "256", "--shard-size", "64", "--steps", "2",
                  "--threads", "1"],
    }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
    Bench("loader", "Loading: our build vs ComfyUI's own build vs the teacher", "bench_loader.py", {
        "cuda": ["--families", "sd1,sd2,sdxl", "--px", "512", "--sdxl-px", "1024", "--rounds", "3"],
        "cpu": ["--families", "sd1,sd2", "--px", "256", "--rounds", "5", "--threads", "1"],
        "quick": ["--families", "sd1", "--models", "segmind/tiny-sd", "--px", "64", "--rounds", "1",
                  "--threads", "1"],
    }, gpu_limit_s=55),
    Bench("lora_coverage", "LoRA coverage: our DistilledLoraLoader vs ComfyUI's LoraLoader on the same files",
          "lora_coverage.py", {
              "cpu": [],
              "quick": ["--students", "bk-tiny / tiny-sd", "--formats", "kohya,peft"],
          }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
    # evaluate: the metrics' cost next to generation's at 64 image pairs (full-size SD 1.5 / bk-tiny UNet calls, CLIP
    # ViT-L/14 and the FID Inception at full size, random weights). It runs on the CPU, also on a GPU machine
    # (beside the GPU benches, whose budget is spent): its table is the CPU's ratio; `python bench/bench_evaluate.py`
    # alone measures it on the GPU.
    Bench("evaluate", "Evaluation: the metrics' cost next to generating the images they judge (64 pairs)",
          "bench_evaluate.py", {
              "cuda": ["--device", "cpu", "--px", "512", "--feature-images", "8", "--rounds", "2", "--threads", "4"],
              "cpu": ["--px", "512", "--feature-images", "8", "--rounds", "2"],
              "quick": ["--px", "256", "--feature-images", "2", "--rounds", "1", "--threads", "1"],
          }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
    Bench("workflows", "Example workflows: every workflows/*.json through the real ComfyUI server", "run_all.py", {
        "cuda": ["--check", "workflows"],
        "cpu": ["--check", "workflows"],
        "quick": ["--check", "workflows", "--quick"],
    }, gpu_limit_s=85),
]


def comfyui_path() -> str:
    return str(Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser())


# ------------------------------------------------------------------------------------------------
# what has to be installed (checked before any bench starts)

# (import name, pip name, what imports it, ComfyUI file): a module with a ComfyUI file is needed only where
# that file of the ComfyUI in use imports it (so comfy_aimdo / comfy_kitchen on 0.33, not on 0.3.64); ""
# = always. Derived from the imports of the benches and of `import comfy.sd, comfy.sample, nodes` and the
# server's `main.py` on 0.3.64 and 0.33 (the top-level third-party modules ComfyUI imports unguarded;
# the optional ones it tries and skips are left out). trampoline: torchsde imports it.
NEEDS = (
    ("torch", "torch", "everything", ""),
    ("numpy", "numpy", "ComfyUI, the benches", ""),
    ("safetensors", "safetensors", "comfy.utils, the pack", ""),
    ("psutil", "psutil", "comfy.model_management, the benches' memory figures", ""),
    ("diffusers", "diffusers", "the benches' reference models (tests/layouts.py, bench_distill.py)", ""),
    ("einops", "einops", "comfy.utils", "comfy/utils.py"),
    ("PIL", "pillow", "comfy.utils", "comfy/utils.py"),
    ("tqdm", "tqdm", "comfy.utils, comfy_execution.progress", ""),
    ("yaml", "pyyaml", "comfy.sd", "comfy/sd.py"),
    ("transformers", "transformers", "comfy.sd1_clip", "comfy/sd1_clip.py"),
    ("scipy", "scipy", "comfy.k_diffusion.sampling", "comfy/k_diffusion/sampling.py"),
    ("torchsde", "torchsde", "comfy.k_diffusion.sampling", "comfy/k_diffusion/sampling.py"),
    ("trampoline", "trampoline", "torchsde", ("comfy/k_diffusion/sampling.py", "torchsde")),
    ("av", "av", "comfy_api.latest's video types (an inert stand-in module named av is enough)",
     "comfy_api/latest/_input/video_types.py"),
    ("comfy_aimdo", "comfy-aimdo", "comfy.model_management (dynamic VRAM)", "comfy/model_management.py"),
    ("comfy_kitchen", "comfy-kitchen", "comfy.ldm.modules.attention", "comfy/ldm/modules/attention.py"),
)
# the server the workflows run through (ComfyUI's main.py); comfy_extras nodes that fail to import are skipped
SERVER_NEEDS = (
    ("aiohttp", "aiohttp", "server.py", "server.py"),
    ("sqlalchemy", "sqlalchemy", "app.database", "app/database/models.py"),
    ("filelock", "filelock", "app.database.db", "app/database/db.py"),
    ("pydantic", "pydantic", "app.assets", "app/assets/api/routes.py"),
    ("pydantic_settings", "pydantic-settings", "comfy_config.config_parser", "comfy_config/config_parser.py"),
    ("requests", "requests", "app.frontend_management", "app/frontend_management.py"),
    ("comfyui_frontend_package", "comfyui-frontend-package", "app.frontend_management (the server exits "
     "without it)", "app/frontend_management.py"),
)


def _imports(comfyui: Path, rel: str, module: str) -> bool:
    f = comfyui / rel
    if not f.is_file():
        return False
    return re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", f.read_text(errors="replace"), re.M) is not None


def missing_modules(comfyui: Path, server: bool) -> list[str]:
    """``["<module> (pip <name>; <what imports it>)", ...]`` for every needed module not importable here."""
    out = []
    for name, pip, why, where in NEEDS + (SERVER_NEEDS if server else ()):
        if where:
            rel, mod = where if isinstance(where, tuple) else (where, name)
            if not _imports(comfyui, rel, mod):
                continue
        if importlib.util.find_spec(name) is None:
            out.append(f"{name} (pip {pip}; {why})")
    return out


def check_installed(benches: list[Bench]) -> str:
    """'' when ComfyUI and everything the chosen benches import are there, else one line naming all of it."""
    sys.path.insert(0, str(ROOT / "tools"))
    import _host

    comfyui = _host.find_comfyui()
    if comfyui is None:
        return f"run_all: {_host.missing_reason()}: nothing run"
    missing = missing_modules(comfyui, server=any(b.name == "workflows" for b in benches))
    if not missing:
        return ""
    return (f"run_all: missing before any bench starts (ComfyUI {_host.comfyui_version(comfyui)} at {comfyui}): "
            + "; ".join(missing) + ". Install them (ComfyUI's requirements.txt has most) and run again.")


# ------------------------------------------------------------------------------------------------
# running the benches


@dataclass
class Result:
    bench: Bench
    command: str
    status: str = "not run"
    seconds: float = 0.0
    peak: str = ""
    phases: tuple[float, float] | None = None  # (setup s, measure s) from the bench's phase line
    output: list[str] = field(default_factory=list)


def _start(bench: Bench, profile: str, env: dict) -> tuple[subprocess.Popen, Result]:
    argv = bench.argv(profile)
    if bench.script == "bench_loader.py":
        argv += ["--comfyui", comfyui_path()]
    shown = " ".join(shlex.quote(a) for a in argv[1:]).replace(str(HERE) + "/", "")
    res = Result(bench, "python bench/" + shown.replace(shlex.quote(comfyui_path()), "$COMFYUI_PATH"))
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    return proc, res


def _collect(proc: subprocess.Popen, res: Result, echo: bool) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            res.output.append(line.rstrip("\n"))
            if echo:
                print(line, end="", flush=True)
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    return th


def _finish(proc, res: Result, thread, t0: float, limit: float | None) -> None:
    import _device

    try:
        rc = proc.wait(timeout=limit)
        res.status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        res.status = f"TIMED OUT after {limit:.0f} s"
    thread.join(timeout=5)
    res.seconds = time.perf_counter() - t0
    peak = [ln for ln in res.output if ln.startswith(_device.PEAK_PREFIX)]
    res.peak = peak[-1].split(":", 1)[1].strip().split(" (")[0] if peak else ""
    phases = [p for p in map(_device.parse_phase_line, res.output) if p is not None]
    res.phases = phases[-1] if phases else None
    skipped = [ln for ln in res.output if re.match(r"^[\w -]+ check: skipped", ln.lower())]  # a GPU-only check
    if res.status == "ok" and skipped:
        res.status = "skipped"


def _demo_weights(env: dict) -> subprocess.Popen:
    """The workflows' demo weights written on the CPU in the background (a GPU run starts it first, so the
    workflows check does not spend its GPU time writing them)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import run_workflow

    argv = [sys.executable, str(ROOT / "tools" / "demo_weights.py"), str(run_workflow.DEFAULT_DEMO_DIR), "--sdxl",
            "--teacher"]
    return subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(benches: list[Bench], profile: str, device: str, budget: float | None) -> list[Result]:
    env = dict(os.environ, BENCH_DEVICE=device, PYTHONUNBUFFERED="1")
    env.setdefault("COMFYUI_PATH", comfyui_path())
    start = time.perf_counter()
    results = []
    background = []
    on_gpu = device.startswith("cuda")
    demo = _demo_weights(env) if on_gpu and profile != "quick" and any(b.name == "workflows" for b in benches) \
        else None
    for b in [b for b in benches if on_gpu and b.device_free]:  # CPU-only benches beside the GPU ones
        proc, res = _start(b, profile, env)
        background.append((proc, res, _collect(proc, res, echo=False), time.perf_counter()))
    for b in benches:
        if on_gpu and b.device_free:
            continue
        limit = None
        if budget is not None:
            left = budget - (time.perf_counter() - start)
            if left < 10:
                res = Result(b, "", status=f"not started: the {budget:.0f} s budget is spent")
                results.append(res)
                continue
            limit = min(b.gpu_limit_s, left)
        if b.name == "workflows" and demo is not None:
            demo.wait()  # started at the beginning; normally long done
        print(f"\n## {b.title}\n", flush=True)
        t0 = time.perf_counter()
        proc, res = _start(b, profile, env)
        print(f"`{res.command}`\n", flush=True)
        th = _collect(proc, res, echo=True)
        _finish(proc, res, th, t0, limit)
        if res.status != "ok":
            print(f"-- {b.name}: {res.status}", flush=True)
        results.append(res)
    for proc, res, th, t0 in background:
        limit = None if budget is None else max(1.0, budget - (time.perf_counter() - start))
        _finish(proc, res, th, t0, limit)
        print(f"\n## {res.bench.title}\n\n`{res.command}` (ran beside the GPU benches: it uses no GPU)\n")
        print("\n".join(res.output), flush=True)
        results.append(res)
    return results


def summary(results: list[Result], device: str, wall: float) -> str:
    lines = [f"run_all: {len(results)} benches on {device} in {wall:.0f} s",
             f"{'bench':14} {'status':38} {'seconds':>8} {'setup s':>8} {'measure s':>9} {'peak memory':>12}"]
    for r in results:
        setup, measure = (f"{r.phases[0]:.1f}", f"{r.phases[1]:.1f}") if r.phases else ("", "")
        lines.append(f"{r.bench.name:14} {r.status:38} {r.seconds:8.1f} {setup:>8} {measure:>9} {r.peak:>12}")
    flows = [ln[len(WORKFLOW_PREFIX):].strip() for r in results for ln in r.output if ln.startswith(WORKFLOW_PREFIX)]
    if flows:
        lines.append("workflows (seconds each, through the server):")
        lines += [f"  {f}" for f in flows]
    return "\n".join(lines)


def write_markdown(path: str, results: list[Result], device_line: str, text: str) -> None:
    parts = [f"# Benchmarks ({device_line})", "", "```", text, "```", ""]
    for r in results:
        parts += [f"## {r.bench.title}", "", f"`{r.command}` ({r.status}, {r.seconds:.0f} s)", "", "```"]
        parts += [ln for ln in r.output if not ln.startswith("bench peak memory:")] + ["```", ""]
    Path(path).write_text("\n".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# the dynamic-VRAM check (runs in its own process: python bench/run_all.py --check dynamic_vram)


def _aimdo_init():
    """comfy-aimdo's first step, before torch is imported (as ComfyUI's main.py does). (module or None, why not)."""
    try:
        import comfy_aimdo.control as aimdo
    except ImportError:
        return None, "comfy-aimdo is not installed (ComfyUI's requirements.txt has it)"
    for kwargs in ({"simple_vram_headroom": None}, {}):  # newer and older comfy-aimdo protocols
        try:
            return (aimdo, "") if aimdo.init(**kwargs) is not False else (None, "comfy-aimdo did not load")
        except TypeError:
            continue
    return None, "comfy-aimdo's init() takes arguments this check does not know"


def _enable_dynamic_vram(aimdo) -> str:
    """Switch ComfyUI's dynamic VRAM on as its main.py does on NVIDIA (comfy-aimdo's devices, then
    CoreModelPatcher -> ModelPatcherDynamic). Returns '' when on, else why not."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no ModelPatcherDynamic (dynamic VRAM came after 0.3.64)"
    devices = mm.get_all_torch_devices()
    try:
        ok = aimdo.init_devices((d.index, 0) for d in devices)
    except TypeError:
        ok = aimdo.init_devices(d.index for d in devices)
    if not ok:
        return "comfy-aimdo could not initialise the devices"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return ""


def check_dynamic_vram(quick: bool) -> int:
    aimdo, why_not = _aimdo_init()
    import _device
    import torch

    ph = _device.Phases()
    if not torch.cuda.is_available():
        print("dynamic VRAM check: skipped (no CUDA device here; dynamic VRAM is a GPU feature, the CPU host "
              "tests cover the rest: tests/comfy/test_patcher.py)")
        print(ph.line())
        return 0
    from _pack import import_pack, random_state_dict, setup_comfy

    device, dtype = _device.setup()
    setup_comfy()
    why_not = why_not or _enable_dynamic_vram(aimdo)
    if why_not:
        print(f"dynamic VRAM check: skipped ({why_not})")
        print(ph.line())
        return 0
    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    import statistics
    import tempfile
    import warnings

    import _tiny_models as tm
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension as pe
    import comfy.sample
    import comfy.sd
    from distilled_unets.models.structure import registry
    from distilled_unets.nodes.host.patcher import expected_shapes, is_dynamic
    from distilled_unets.nodes.host.unet import comfy_model, load_distilled_unet
    from distilled_unets.nodes.sampling import MultiUNetModel
    from safetensors.torch import save_file

    warnings.filterwarnings("ignore")
    print(_device.describe(device, dtype) + "; dynamic VRAM on (ModelPatcherDynamic, comfy-aimdo)")

    def random_ldm(topo, seed: int) -> dict:
        """Drawn on the GPU, kept in RAM as a file's tensors would be (dynamic VRAM streams from RAM)."""
        shapes = expected_shapes(comfy_model(topo, dtype, device="meta").diffusion_model)
        return random_state_dict(shapes, dtype, device, seed, to="cpu")

    steps, px = (6, 256) if quick else (20, 512)
    rounds, max_rounds = (1, 1) if quick else (2, 4)
    tmp = Path(tempfile.mkdtemp(prefix="dynamic_vram_"))
    student_file = tmp / "tiny-sd.safetensors"  # an ldm-layout single file, as users have them
    save_file(random_ldm(registry.by_id("segmind/tiny-sd").structure, 1), str(student_file))
    teacher_sd = random_ldm(registry.TEACHERS["sd1"].structure, 2)

    def student(dynamic: bool):
        saved = getattr(comfy.model_patcher, "CoreModelPatcher", None)
        if not dynamic:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcher
        try:
            return load_distilled_unet(str(student_file), "fp16" if dtype == torch.float16 else "default")[0]
        finally:
            if saved is not None:
                comfy.model_patcher.CoreModelPatcher = saved

    def teacher(dynamic: bool):
        return comfy.sd.load_diffusion_model_state_dict(dict(teacher_sd), model_options={"dtype": dtype},
                                                       disable_dynamic=not dynamic)

    pos, neg = tm.conditioning("sd15", tokens=77)
    lat = tm.latent(px // 8)
    noise = comfy.sample.prepare_noise(lat, 0)
    rows, images = [], {}
    cases = [("dynamic + dynamic", True, True), ("legacy + dynamic", False, True), ("legacy + legacy", False, False)]
    for label, s_dyn, t_dyn in cases:
        calls: list = []
        try:
            s, t = student(s_dyn), teacher(t_dyn)
            for p, tag in ((s, "early"), (t, "late")):
                p.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_spy",
                                       lambda ex, *a, _tag=tag, **k: (calls.append(_tag), ex(*a, **k))[1])
            multi = MultiUNetModel.execute(s, t, 0.4).result[0]
            comfy.sample.sample(multi, noise, 2, 7.0, "euler", "karras", pos, neg, lat, seed=0, disable_pbar=True)
            peak = [0.0]

            def one_run(multi=multi):
                calls.clear()
                with _device.PeakMemory(device) as pm:
                    t0 = time.perf_counter()
                    images[label] = comfy.sample.sample(multi, noise, steps, 7.0, "dpmpp_2m", "karras", pos, neg,
                                                        lat, seed=0, disable_pbar=True)
                    _device.sync(device)
                    secs = time.perf_counter() - t0
                peak[0] = max(peak[0], pm.mib)
                return secs

            ph.measuring()
            times = _device.steady_rounds({label: one_run}, rounds, max_rounds)[label]
            ph.setting_up()
            kinds = "/".join("dynamic" if is_dynamic(p) else "legacy" for p in (s, t))
            rows.append((label, kinds, f"{calls.count('early')}/{calls.count('late')}",
                         _device.ms3(statistics.median(times)), f"{_device.spread(times):.1%}", str(len(times)),
                         f"{peak[0]:.0f}", str(bool(torch.isfinite(images[label]).all()))))
            del s, t, multi
        except Exception as e:  # one case failing must not hide the others
            ph.setting_up()
            rows.append((label, "-", "-", "-", "-", "-", "-", f"FAILED: {type(e).__name__}: {str(e)[:150]}"))
        mm.unload_all_models()
        mm.soft_empty_cache()
    print(f"\nmulti-UNet tiny-sd (pack loader) -> SD1.5 (ComfyUI's loader) at 0.4, dpmpp_2m/karras, {steps} steps, "
          f"cfg 7, {px} px, random weights; median of {rounds}-{max_rounds} runs (more while spread > 5 %)")
    print(f"{'case (student + teacher)':26} {'patchers built':16} {'calls early/late':>16} {'ms':>7} {'spread':>6} "
          f"{'runs':>4} {'peak MiB':>9} finite")
    for r in rows:
        print(f"{r[0]:26} {r[1]:16} {r[2]:>16} {r[3]:>7} {r[4]:>6} {r[5]:>4} {r[6]:>9} {r[7]}")
    ref = images.get("legacy + legacy")
    for label, img in images.items():
        if ref is not None and label != "legacy + legacy":
            rel = ((img - ref).abs().max() / ref.abs().max()).item()
            print(f"{label} vs legacy + legacy: max relative difference {rel:.2e}")
    student_file.unlink(missing_ok=True)
    tmp.rmdir()
    print(ph.line())
    print(_device.peak_line(device))
    return 0 if all("FAILED" not in r[-1] for r in rows) else 1


# ------------------------------------------------------------------------------------------------
# the example workflows through the real server (python bench/run_all.py --check workflows)


def _server(comfyui: Path, model_dirs: list, device: str):
    """tools/comfy_server.ComfyServer on the bench's device. It starts ComfyUI with ``--cpu`` (the tools run
    on CPUs); a GPU run drops that one argument from the command line the server starts (until the server
    takes the device itself: a ``cpu=`` keyword is used when it has one)."""
    import inspect
    import unittest.mock

    import comfy_server

    extra = []
    if ":" in device:
        extra = ["--cuda-device", device.split(":", 1)[1]]
    if not device.startswith("cuda"):
        return comfy_server.ComfyServer(comfyui, model_dirs, extra_args=extra)
    if "cpu" in inspect.signature(comfy_server.ComfyServer).parameters:
        return comfy_server.ComfyServer(comfyui, model_dirs, extra_args=extra, cpu=False)

    class DeviceServer(comfy_server.ComfyServer):
        def start(self):
            popen = subprocess.Popen

            def on_device(cmd, *args, **kwargs):
                return popen([c for c in cmd if c != "--cpu"], *args, **kwargs)

            with unittest.mock.patch.object(comfy_server.subprocess, "Popen", on_device):
                return super().start()

    return DeviceServer(comfyui, model_dirs, extra_args=extra)


def check_workflows(quick: bool) -> int:
    import shutil
    import tempfile

    import _device

    ph = _device.Phases()
    sys.path.insert(0, str(ROOT / "tools"))
    import _host
    import demo_weights
    import run_workflow
    from comfy_server import PromptRejected, ServerError
    from ui_to_api import ConversionError

    device = _device.pick_device()
    comfyui = _host.find_comfyui()
    if comfyui is None:
        print(f"workflows: FAILED ({_host.missing_reason()})")
        return 1
    files = sorted((ROOT / "workflows").glob("*.json"))
    if quick:
        files = [f for f in files if f.name == QUICK_WORKFLOW]
    demo_dir = run_workflow.DEFAULT_DEMO_DIR
    # demo weights before the clock (a GPU run_all writes them in the background from its start)
    demo_weights.ensure(demo_dir, sdxl=not quick, teacher=not quick)
    out = Path(tempfile.mkdtemp(prefix="run_all_workflows_"))  # the PNGs are noise: thrown away
    rows, failed = [], 0
    print(f"workflows through ComfyUI {_host.comfyui_version(comfyui)}'s server on {device} "
          f"(demo weights where the models are not installed: the images are noise; "
          f"{run_workflow.DEMO_STEPS} steps at {run_workflow.DEMO_SIZE[0]}x{run_workflow.DEMO_SIZE[1]} then)")
    try:
        with _server(comfyui, run_workflow.server_model_dirs(None, demo_dir), device) as server:
            ph.measuring()
            for f in files:
                t0 = time.perf_counter()
                try:
                    r = run_workflow.run_one(server, f, out, demo_dir)
                    status = f"ok ({len(r['images'])} image(s){', demo weights' if r['swaps'] else ''})"
                except (run_workflow.WorkflowError, ConversionError, PromptRejected, ServerError) as e:
                    failed += 1
                    status = f"FAILED: {str(e)[:300]}"
                rows.append((f.name, time.perf_counter() - t0, status))
                print(f"{WORKFLOW_PREFIX} {f.name} {rows[-1][1]:.1f} s {status}", flush=True)
            ph.setting_up()
            if failed:
                print("server log (last lines):\n" + server.log_tail(40))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(ph.line())
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings for every bench (a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated bench names (default: all): "
                    + ", ".join(b.name for b in BENCHES))
    ap.add_argument("--markdown", default="", help="also write every table with its command to this file")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole run (default: {GPU_BUDGET_S} on a GPU, none on a CPU)")
    ap.add_argument("--check", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check == "dynamic_vram":
        return check_dynamic_vram(a.quick)
    if a.check == "workflows":
        return check_workflows(a.quick)

    names = [n for n in a.only.split(",") if n]
    unknown = set(names) - {b.name for b in BENCHES}
    if unknown:
        sys.exit(f"unknown bench(es) {sorted(unknown)}; known: {[b.name for b in BENCHES]}")
    benches = [b for b in BENCHES if not names or b.name in names]
    missing = check_installed(benches)
    if missing:
        print(missing, flush=True)
        return 2
    import _device

    device = _device.pick_device()
    dtype = _device.default_dtype_name(device)
    profile = "quick" if a.quick else ("cuda" if device.startswith("cuda") else "cpu")
    budget = a.budget if a.budget is not None else (GPU_BUDGET_S if device.startswith("cuda") else None)
    print(f"run_all: {len(benches)} benches, device {device}, {dtype}, settings '{profile}'"
          + (f", budget {budget:.0f} s" if budget else "") + f", ComfyUI at {comfyui_path()}", flush=True)
    t0 = time.perf_counter()
    results = run(benches, profile, device, budget)
    text = summary(results, f"{device} ({dtype})", time.perf_counter() - t0)
    print("\n" + text)
    if a.markdown:
        write_markdown(a.markdown, results, f"{device}, {dtype}, settings '{profile}'", text)
        print(f"tables written to {a.markdown}")
    bad = [r for r in results if r.status not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
