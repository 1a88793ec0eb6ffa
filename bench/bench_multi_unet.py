# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: end-to-end multi-UNet sampling (A-SDM) against the teacher alone and the step-weighted mix.

Early UNet: tiny-sd topology (3 levels, 1 resnet per level, no mid block); late UNet: SD1.5 topology.
Both are random-weight, built through ComfyUI's own classes, once per process, where they run (the
classes constructed on the device, the weights drawn there from a seeded generator: a GPU run never
draws full-size weights on the CPU). --channels 320 is full width; smaller values (the CPU's quick
settings) are said in the header. Every run is sampled twice before the clock starts; then interleaved
rounds (``_device.steady_rounds``): at least --reps, more while a run's spread (median - best) / best is above
5 %, up to --max-rounds; the figure is the median. Times in milliseconds, three significant figures.

    python bench/bench_multi_unet.py [--steps 20] [--switch 0.4] [--reps 5] [--max-rounds 15]
        [--size 64] [--channels 320] [--compile auto|none|inductor|aot_eager|...]

Routing overhead = multi-UNet time / (k/n * student time + (n-k)/n * teacher time) - 1, target <= 1 %;
the per-round figure (each round runs every model back to back, so slow drift cancels) is the one
judged, and "same UNet twice" isolates the router (identical UNet work to the teacher alone).

Compiled rows (--compile; auto = inductor on a GPU, none on a CPU), printed after the eager table: ComfyUI's
own TorchCompileModel node on each UNet before MultiUNetModel, against each compiled UNet alone and their
mix; the first runs compile (setup, their seconds printed), and the graph count is checked unchanged after
them (nothing recompiles in the warm-up or the rounds).

Device: CUDA in fp16 when a GPU is there, else the CPU in fp32 (bench/_device.py; BENCH_DEVICE /
BENCH_DTYPE override); times are wall time on a GPU and the process's CPU time on a CPU (run those with
--threads 1; see _device.clock_for); on a GPU each run's peak memory (torch.cuda.max_memory_allocated) is a column.
The last two lines are the ones run_all.py reads back: the phase line (setup: imports, building,
compiling and warm-up; measure: the timed rounds) and the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import _device
from _device import ms3
from _pack import ROOT, import_pack, random_patcher, setup_comfy  # noqa: E402

PH = _device.Phases()  # setup counts from the process's start


def _setup():
    device, dtype = _device.setup()
    setup_comfy()
    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    return device, dtype


def _router_us(by_step, steps: int) -> float:
    """Host time of the router's own work per model call (split, decide, early options), timed alone."""
    import comfy.patcher_extension as pe
    import torch
    from distilled_unets.models.patches.multi_unet import KEY_PREFIX, split_apply_args, stage_transformer_options

    (key,) = [k for k in by_step.additional_models if k.startswith(KEY_PREFIX)]
    router = by_step.get_wrappers(pe.WrappersMP.APPLY_MODEL, key)[0]
    early_p = by_step.get_additional_models_with_key(router.key)[0]
    sample_sigmas = torch.linspace(14.6, 0.0, steps + 1)
    to = {"cond_or_uncond": [1, 0], "uuids": [None, None], "sigmas": torch.tensor([3.0, 3.0]),
          "sample_sigmas": sample_sigmas, "patches": {}, "wrappers": {}, "callbacks": {}}
    call_args = (None, torch.tensor([3.0, 3.0]), None, "ctx", None, to)
    n_calls = 20000
    now = _device.clock_for("cpu")  # host work only
    t0 = now()
    for _ in range(n_calls):
        _x, t_, c_ = split_apply_args(call_args, {})
        router.stage(float(t_.reshape(-1)[0]), sample_sigmas)
        stage_transformer_options(early_p, to, by_step.model_options["transformer_options"])
    return (now() - t0) / n_calls * 1e6


def _compile(model, backend: str):
    """ComfyUI's own TorchCompileModel node on ``model`` (a patched clone; compiles at its first run)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    res = TorchCompileModel.execute(model, backend)
    return res[0] if isinstance(res, tuple) else res.result[0]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--switch", type=float, default=0.4, help="fraction of steps on the small UNet")
    ap.add_argument("--reps", type=int, default=5, help="rounds kept per run (the fastest ones)")
    ap.add_argument("--max-rounds", type=int, default=15, help="at most this many rounds while a spread is > 5 %%")
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px images)")
    ap.add_argument("--channels", type=int, default=320, help="model_channels of both UNets (320 = full width)")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", default="auto", help="torch.compile backend for the compiled rows "
                    "(TorchCompileModel); auto = inductor on a GPU, none on a CPU")
    a = ap.parse_args()

    device, dtype = _setup()
    import torch

    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("distilled_unets").setLevel(logging.WARNING)
    import _tiny_models as tm
    import comfy.sample
    import comfy.samplers
    from distilled_unets.models.patches.multi_unet import steps_per_stage
    from distilled_unets.models.structure import registry
    from distilled_unets.nodes.sampling import MultiUNetModel, SwitchPoint, make_multi_unet_model

    gpu = device.type == "cuda"
    backend = ("inductor" if gpu else "none") if a.compile == "auto" else a.compile
    t_build = time.perf_counter()
    student = random_patcher(tm.tiny(registry.by_id("segmind/tiny-sd").structure, "sd15", model_channels=a.channels),
                             dtype, device, 1)
    teacher = random_patcher(tm.tiny(registry.TEACHERS["sd1"].structure, "sd15", model_channels=a.channels),
                             dtype, device, 2)
    _device.sync(device)
    t_build = time.perf_counter() - t_build
    k = round(a.switch * a.steps)
    by_step = make_multi_unet_model(student, teacher, SwitchPoint.from_step(k), node="bench")
    by_percent = MultiUNetModel.execute(student, teacher, a.switch).result[0]
    # the same UNet as early and late: identical UNet work to the teacher alone, so the difference is the
    # router's own cost, free of the mix's modelling (the cleanest overhead measurement)
    twice = make_multi_unet_model(teacher, teacher, SwitchPoint.from_step(k), node="bench")
    runs = {"teacher": teacher, "student": student, "multi_step": by_step, "multi_percent": by_percent,
            "twice": twice}
    pos, neg = tm.conditioning("sd15", tokens=77)
    lat = tm.latent(a.size)
    noise = comfy.sample.prepare_noise(lat, 0)
    sig = comfy.samplers.KSampler(teacher, a.steps, "cpu", a.sampler, "karras").sigmas.tolist()
    kp = steps_per_stage(sig, [teacher.get_model_object("model_sampling").percent_to_sigma(a.switch)])[0]
    now = _device.clock_for(device)
    peaks: dict[str, float] = {}

    def run(tag):
        with _device.PeakMemory(device) if gpu else _NoPeak() as pm:
            _device.sync(device)
            t = now()
            comfy.sample.sample(runs[tag], noise, a.steps, 7.0, a.sampler, "karras", pos, neg, lat, seed=0,
                                disable_pbar=True)
            _device.sync(device)
            t = now() - t
        peaks[tag] = max(peaks.get(tag, 0.0), pm.mib)
        return t

    def warm_and_measure(tags):
        """Every run sampled twice off the clock (loading, kernels picked, torch.compile), then the rounds."""
        t_warm = time.perf_counter()
        for tag in tags:
            run(tag)
            run(tag)
        t_warm = time.perf_counter() - t_warm
        with PH.measure():
            times = _device.steady_rounds({tag: (lambda tag=tag: run(tag)) for tag in tags}, a.reps, a.max_rounds)
        res = {tag: {"s": statistics.median(v), "spread": _device.spread(v) * 100, "rounds": len(v), "all": v}
               for tag, v in times.items()}
        return res, t_warm

    def mix(s_student, s_teacher, n_early):
        return n_early / a.steps * s_student + (a.steps - n_early) / a.steps * s_teacher

    def per_round(res, tag, student_tag, teacher_tag, n_early) -> float:
        """Median over rounds of run / mix of that round's own student and teacher runs."""
        return statistics.median(t / mix(s, te, n_early) for t, s, te in
                                 zip(res[tag]["all"], res[student_tag]["all"], res[teacher_tag]["all"]))

    def row(res, name, tag, t_ref, vs_mix=None):
        t = res[tag]["s"] if tag else vs_mix
        cells = (f"{res[tag]['spread']:9.1f} {res[tag]['rounds']:6d}" if tag else f"{'':>9} {'':>6}")
        vm = f"{t / vs_mix:8.4f}" if tag and vs_mix else f"{'':>8}"
        peak = (f" {peaks[tag]:9.0f}" if tag else f" {'':>9}") if gpu else ""
        print(f"{name:<44} {ms3(t):>9} {cells} {t_ref / t:10.3f}x {vm}{peak}", flush=True)

    header = (f"{'run':<44} {'ms':>9} {'spread %':>9} {'rounds':>6} {'vs teacher':>11} {'vs mix':>8}"
              + (f" {'peak MiB':>9}" if gpu else ""))

    # -- eager: the table the targets are judged on -------------------------------------------------
    res, t_warm = warm_and_measure(list(runs))
    with PH.measure():
        route_us = _router_us(by_step, a.steps)
    best = {tag: r["s"] for tag, r in res.items()}
    print(f"multi-UNet bench: {a.sampler}/karras, {a.steps} steps, cfg 7 (batch 2), latent {a.size}x{a.size} "
          f"({a.size * 8} px), "
          + (f"REDUCED WIDTH model_channels={a.channels} (real SD1.5: 320), " if a.channels != 320 else "full width, ")
          + f"{_device.describe(device, dtype)}; {_device.clock_name(device)}, median of at least {a.reps} "
          "interleaved rounds")
    n_params = [sum(p.numel() for p in m.model.parameters()) / 1e6 for m in (student, teacher)]
    print(f"early: tiny-sd topology ({n_params[0]:.1f}M params), late: SD1.5 topology ({n_params[1]:.1f}M params); "
          f"built on {device} in {t_build:.1f} s, warm-up {t_warm:.1f} s")
    print()
    print(header)
    mix_k = mix(best["student"], best["teacher"], k)
    mix_p = mix(best["student"], best["teacher"], kp)
    row(res, "teacher alone", "teacher", best["teacher"])
    row(res, "student alone", "student", best["teacher"])
    row(res, f"step-weighted mix ({k}/{a.steps} student)", None, best["teacher"], mix_k)
    row(res, f"MultiUNetKSampler path, step {k}", "multi_step", best["teacher"], mix_k)
    row(res, f"MultiUNetModel {a.switch:g} ({kp}/{a.steps} early)", "multi_percent", best["teacher"], mix_p)
    row(res, "same UNet twice (vs teacher alone)", "twice", best["teacher"], best["teacher"])
    print()
    over_k = (per_round(res, "multi_step", "student", "teacher", k) - 1) * 100
    over_p = (per_round(res, "multi_percent", "student", "teacher", kp) - 1) * 100
    over_twice = (statistics.median(t / te for t, te in zip(res["twice"]["all"], res["teacher"]["all"])) - 1) * 100
    print(f"speed-up vs teacher: {best['teacher'] / best['multi_step']:.3f}x (step {k}), "
          f"{best['teacher'] / best['multi_percent']:.3f}x (percent {a.switch:g})")
    per_call_student = best["student"] / a.steps * 1e6
    print(f"router work per model call: {route_us:.1f} us = {route_us / per_call_student * 100:.2g} % of one "
          f"student call ({ms3(per_call_student / 1e6)} ms) at this size")
    print(f"routing overhead over the step-weighted mix (median of per-round ratios): {over_k:+.2f} % (step), "
          f"{over_p:+.2f} % (percent); target <= 1 % -> {'OK' if max(over_k, over_p) <= 1.0 else 'ABOVE TARGET'}")
    print(f"routing overhead, same UNet twice vs that UNet alone (median of per-round ratios): {over_twice:+.2f} %; "
          f"target <= 1 % -> {'OK' if over_twice <= 1.0 else 'ABOVE TARGET'}")
    worst = max(r["spread"] for r in res.values())
    if worst > 5.0:
        print(f"note: a spread of {worst:.1f} % remained after {max(r['rounds'] for r in res.values())} rounds "
              f"(this machine is shared); the router's own per-call work above bounds the true overhead")
    sys.stdout.flush()

    # -- compiled: ComfyUI's TorchCompileModel on each UNet before MultiUNetModel (printed after the eager
    # table, so a time limit hit while compiling leaves that table in the log) ------------------------
    if backend != "none":
        c_student, c_teacher = _compile(student, backend), _compile(teacher, backend)
        runs.update({"c_teacher": c_teacher, "c_student": c_student,
                     "c_multi": MultiUNetModel.execute(c_student, c_teacher, a.switch).result[0]})
        tags = ["c_teacher", "c_student", "c_multi"]
        t_compile = time.perf_counter()
        for tag in tags:  # the first run compiles; not part of the warm-up below
            run(tag)
        t_compile = time.perf_counter() - t_compile
        graphs_before = _graphs()
        cres, _ = warm_and_measure(tags)
        new_graphs = _graphs() - graphs_before
        print(f"\ncompiled (TorchCompileModel, backend {backend}, on each UNet before MultiUNetModel): first runs "
              f"(compiling) {t_compile:.1f} s")
        print(header)
        c_mix = mix(cres["c_student"]["s"], cres["c_teacher"]["s"], kp)
        row(cres, "teacher alone, compiled", "c_teacher", best["teacher"])
        row(cres, "student alone, compiled", "c_student", best["teacher"])
        row(cres, f"compiled step-weighted mix ({kp}/{a.steps} early)", None, best["teacher"], c_mix)
        row(cres, f"MultiUNetModel {a.switch:g}, both UNets compiled", "c_multi", best["teacher"], c_mix)
        over_c = (per_round(cres, "c_multi", "c_student", "c_teacher", kp) - 1) * 100
        print(f"compiled: routing overhead over the compiled mix (median of per-round ratios) {over_c:+.2f} % "
              f"({'OK' if over_c <= 1.0 else 'ABOVE TARGET'}); speed-up vs the compiled teacher "
              f"{cres['c_teacher']['s'] / cres['c_multi']['s']:.3f}x; graphs compiled after the first runs: "
              f"{new_graphs} ({'nothing recompiled' if new_graphs == 0 else 'RECOMPILED'})")
    print(PH.line())
    print(_device.peak_line(device))


class _NoPeak:
    """Stands in for _device.PeakMemory on the CPU (its RSS polling thread would disturb the timings)."""
    mib = float("nan")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
