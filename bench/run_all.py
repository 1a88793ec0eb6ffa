# ruff: noqa: T201  (bench scripts print their tables)
"""Every bench in bench/, one command, on whatever device is there.

    python bench/run_all.py                 # CUDA in fp16 when a GPU is there (about 8 minutes), else CPU fp32
    python bench/run_all.py --quick         # small settings: proves every bench runs (minutes on a CPU)
    python bench/run_all.py --only gri,multi_unet --markdown out.md

Each bench runs in its own process (no state leaks between them: ComfyUI's model management, the GRI
bench's attention backend), with the settings of ``BENCHES`` for the device: on a GPU those that fit the
8-minute budget (each bench also has a time limit, and the run stops starting benches once the budget
is spent); on a CPU those of docs/benchmarks.md (about an hour on 2 cores). The tables print as the
benches write them, then one summary: status, seconds and peak memory of each
(``torch.cuda.max_memory_allocated`` on a GPU, max RSS on the CPU). ``--markdown`` also writes every
table with its command, as docs/benchmarks.md holds them.

A new bench (student builder, distillation, CondConv, ...) is one more ``Bench`` entry in ``BENCHES``:
a script in bench/ that prints its table and ends with ``_device.peak_line``.

Also here: the dynamic-VRAM check (GPU only; a line says it was skipped on a CPU). ComfyUI 0.33 turns
dynamic VRAM on by default on NVIDIA (``ModelPatcherDynamic``): a student loaded through the pack is
sampled next to a teacher from ComfyUI's own loader as one multi-UNet MODEL, dynamic + dynamic and
legacy + dynamic, against legacy + legacy: steps per UNet, time, peak memory and the difference of the
images.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU_BUDGET_S = 480  # the whole run on one GPU: 8 minutes


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


# The registry: every bench and check run_all runs, in order. Add new ones here.
BENCHES = [
    Bench("multi_unet", "Multi-UNet sampling (A-SDM): tiny-sd early, SD1.5 late", "bench_multi_unet.py", {
        "cuda": ["--channels", "320", "--size", "64", "--steps", "20", "--reps", "5"],
        "cpu": ["--channels", "320", "--size", "32", "--steps", "10", "--reps", "4", "--threads", "2"],
        "quick": ["--channels", "32", "--size", "8", "--steps", "4", "--reps", "1"],
    }, gpu_limit_s=45),
    Bench("gri", "GRI attention vs exact attention vs ComfyUI's HyperTile at equal window", "bench_gri.py", {
        "cuda": ["--reps", "5", "--sizes", "512,1024,2048", "--unet-sizes", "512,1024"],
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
        "cuda": ["--families", "sd1,sd2,sdxl", "--rounds", "3"],
        "cpu": ["--px-sd", "256", "--px-sdxl", "512", "--rounds", "3", "--threads", "2"],
        "quick": ["--families", "sd1", "--px-sd", "64", "--rounds", "1"],
    }, gpu_limit_s=75),
    Bench("distill", "Distillation: one KD training step, the pack vs BK-SDM's step on diffusers", "bench_distill.py", {
        "cuda": ["--preset", "bk-small", "--width", "full", "--size", "64", "--batch", "1,4,8", "--reps", "2"],
        "cpu": ["--threads", "2", "--reps", "2", "--steps", "4", "--warmup", "1"],
        "quick": ["--threads", "2", "--reps", "1", "--steps", "1", "--warmup", "1", "--checkpointing", "off"],
    }, gpu_limit_s=90),
    Bench("condconv", "CondConv (A-SDM CLME): per-step cost of a tiny-sd student, with and without",
          "bench_condconv.py", {
        "cuda": ["--device", "cuda", "--batches", "1,2", "--reps", "10", "--conv-reps", "20"],
        "cpu": ["--reps", "3", "--conv-reps", "5", "--threads", "2"],
        "quick": ["--channels", "32", "--size", "16", "--reps", "1", "--conv-reps", "1"],
    }, gpu_limit_s=40),
    Bench("loader", "Loading: our build vs ComfyUI's own build vs the teacher", "bench_loader.py", {
        "cuda": ["--families", "sd1,sd2,sdxl", "--px", "512", "--sdxl-px", "1024", "--rounds", "3"],
        "cpu": ["--families", "sd1,sd2", "--px", "256", "--rounds", "5", "--threads", "2"],
        "quick": ["--families", "sd1", "--px", "64", "--rounds", "1"],
    }, gpu_limit_s=120),
    Bench("lora_coverage", "LoRA coverage: our DistilledLoraLoader vs ComfyUI's LoraLoader on the same files",
          "lora_coverage.py", {
              "cpu": [],
              "quick": ["--students", "bk-tiny / tiny-sd", "--formats", "kohya,peft"],
          }, gpu_limit_s=GPU_BUDGET_S, device_free=True),
]


def comfyui_path() -> str:
    return str(Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser())


# ------------------------------------------------------------------------------------------------
# running the benches


@dataclass
class Result:
    bench: Bench
    command: str
    status: str = "not run"
    seconds: float = 0.0
    peak: str = ""
    output: list[str] = field(default_factory=list)


def _start(bench: Bench, profile: str, env: dict) -> tuple[subprocess.Popen, Result]:
    argv = bench.argv(profile)
    if bench.script == "bench_loader.py":
        argv += ["--comfyui", comfyui_path()]
    shown = " ".join(shlex.quote(a) for a in argv[1:]).replace(str(HERE) + "/", "")
    res = Result(bench, "python bench/" + shown.replace(shlex.quote(comfyui_path()), "$COMFYUI_PATH"))
    proc = subprocess.Popen(argv, cwd=str(HERE.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
    try:
        rc = proc.wait(timeout=limit)
        res.status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        res.status = f"TIMED OUT after {limit:.0f} s"
    thread.join(timeout=5)
    res.seconds = time.perf_counter() - t0
    peak = [ln for ln in res.output if ln.startswith("bench peak memory:")]
    res.peak = peak[-1].split(":", 1)[1].strip().split(" (")[0] if peak else ""
    skipped = [ln for ln in res.output if ln.lower().startswith("dynamic vram check: skipped")]
    if res.status == "ok" and skipped:
        res.status = "skipped"


def run(benches: list[Bench], profile: str, device: str, budget: float | None) -> list[Result]:
    env = dict(os.environ, BENCH_DEVICE=device, PYTHONUNBUFFERED="1")
    env.setdefault("COMFYUI_PATH", comfyui_path())
    start = time.perf_counter()
    results = []
    background = []
    on_gpu = device.startswith("cuda")
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
             f"{'bench':14} {'status':38} {'seconds':>8} {'peak memory':>12}"]
    for r in results:
        lines.append(f"{r.bench.name:14} {r.status:38} {r.seconds:8.1f} {r.peak:>12}")
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
    import torch

    if not torch.cuda.is_available():
        print("dynamic VRAM check: skipped (no CUDA device here; dynamic VRAM is a GPU feature, the CPU host "
              "tests cover the rest: tests/comfy/test_patcher.py)")
        return 0
    import _device
    from _pack import ROOT, import_pack, setup_comfy

    device, dtype = _device.setup()
    setup_comfy()
    why_not = why_not or _enable_dynamic_vram(aimdo)
    if why_not:
        print(f"dynamic VRAM check: skipped ({why_not})")
        return 0
    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    import tempfile
    import warnings

    import _tiny_models as tm
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension as pe
    import comfy.sample
    import comfy.sd
    from distilled_unets.models import registry
    from distilled_unets.nodes._glue import comfy_model, load_distilled_unet
    from distilled_unets.nodes._patcher import expected_shapes, is_dynamic
    from distilled_unets.nodes.sampling import MultiUNetModel
    from safetensors.torch import save_file

    warnings.filterwarnings("ignore")
    print(_device.describe(device, dtype) + "; dynamic VRAM on (ModelPatcherDynamic, comfy-aimdo)")

    def random_ldm(topo, seed: int) -> dict:
        shapes = expected_shapes(comfy_model(topo, dtype, device="meta").diffusion_model)
        g = torch.Generator().manual_seed(seed)
        return {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}

    steps, px = (6, 256) if quick else (20, 512)
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
            calls.clear()
            with _device.PeakMemory(device) as pm:
                t0 = time.perf_counter()
                out = comfy.sample.sample(multi, noise, steps, 7.0, "dpmpp_2m", "karras", pos, neg, lat, seed=0,
                                          disable_pbar=True)
                _device.sync(device)
                secs = time.perf_counter() - t0
            images[label] = out
            kinds = "/".join("dynamic" if is_dynamic(p) else "legacy" for p in (s, t))
            rows.append((label, kinds, f"{calls.count('early')}/{calls.count('late')}", f"{secs:.2f}",
                         f"{pm.mib:.0f}", str(bool(torch.isfinite(out).all()))))
            del s, t, multi
        except Exception as e:  # one case failing must not hide the others
            rows.append((label, "-", "-", "-", "-", f"FAILED: {type(e).__name__}: {str(e)[:150]}"))
        mm.unload_all_models()
        mm.soft_empty_cache()
    print(f"\nmulti-UNet tiny-sd (pack loader) -> SD1.5 (ComfyUI's loader) at 0.4, dpmpp_2m/karras, {steps} steps, "
          f"cfg 7, {px} px, random weights")
    print(f"{'case (student + teacher)':26} {'patchers built':16} {'calls early/late':>16} {'s':>7} "
          f"{'peak MiB':>9} finite")
    for r in rows:
        print(f"{r[0]:26} {r[1]:16} {r[2]:>16} {r[3]:>7} {r[4]:>9} {r[5]}")
    ref = images.get("legacy + legacy")
    for label, img in images.items():
        if ref is not None and label != "legacy + legacy":
            rel = ((img - ref).abs().max() / ref.abs().max()).item()
            print(f"{label} vs legacy + legacy: max relative difference {rel:.2e}")
    print(_device.peak_line(device))
    return 0 if all("FAILED" not in r[5] for r in rows) else 1


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

    import _device

    device = _device.pick_device()
    dtype = _device.default_dtype_name(device)
    profile = "quick" if a.quick else ("cuda" if device.startswith("cuda") else "cpu")
    budget = a.budget if a.budget is not None else (GPU_BUDGET_S if device.startswith("cuda") else None)
    names = [n for n in a.only.split(",") if n]
    unknown = set(names) - {b.name for b in BENCHES}
    if unknown:
        sys.exit(f"unknown bench(es) {sorted(unknown)}; known: {[b.name for b in BENCHES]}")
    benches = [b for b in BENCHES if not names or b.name in names]
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
