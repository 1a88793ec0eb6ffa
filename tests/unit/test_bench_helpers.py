"""The bench helpers run_all.py relies on: the phase line it reads back, the timing format, the spread rule
(more rounds, bounded), the device peak table, and the up-front check of what has to be installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dev():
    return _load("_device")


@pytest.fixture(scope="module")
def run_all():
    _load("_device")
    return _load("run_all")


def test_phase_line_round_trip(dev):
    line = dev.phase_line(12.345, 0.06)
    assert line.startswith(dev.PHASE_PREFIX)
    assert dev.parse_phase_line(line) == (12.3, 0.1)
    assert dev.parse_phase_line("bench peak memory: 12 MiB") is None


def test_phases_split_setup_and_measure(dev, monkeypatch):
    clock = iter([0.0, 2.0, 5.0, 6.0, 6.5])
    ph = dev.Phases(start=next(clock))
    monkeypatch.setattr(dev.time, "perf_counter", lambda: next(clock))
    ph.measuring()        # 2.0: setup 2
    ph.setting_up()       # 5.0: measure 3
    ph.measuring()        # 6.0: setup 1
    ph.count_as_setup(0.25)
    line = ph.line()      # 6.5: measure 0.5, 0.25 of it moved to setup
    monkeypatch.undo()
    assert (ph.setup_s, ph.measure_s) == (3.25, 3.25)
    assert dev.parse_phase_line(line) == (3.2, 3.2)


def test_phases_measure_block_returns_to_the_phase_before(dev, monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 4.5, 5.0, 7.0, 7.5])
    ph = dev.Phases(start=next(clock))
    monkeypatch.setattr(dev.time, "perf_counter", lambda: next(clock))
    with ph.measure():    # 1.0: setup 1 ... 4.0: measure 3, back to setup
        pass
    ph.measuring()        # 4.5: setup 0.5
    with ph.measure():    # 5.0: measure 0.5 ... 7.0: measure 2, and stays measuring after the block
        pass
    ph.line()             # 7.5: measure 0.5
    monkeypatch.undo()
    assert (ph.setup_s, ph.measure_s) == (1.5, 6.0)


@pytest.mark.parametrize("x, text", [(0.0305, "0.0305"), (39261, "39300"), (1.0, "1.00"), (-2.345, "-2.35")])
def test_sig3(dev, x, text):
    assert dev.sig3(x) == text


def test_clock_is_cpu_time_on_a_cpu(dev):
    import time

    assert dev.clock_for("cpu") is time.process_time and dev.clock_name("cpu") == "CPU time of the process"


@pytest.mark.parametrize("seconds, text", [(0.0123, "12.3"), (1.234, "1230"), (0.0006, "0.600"), (0.1, "100"),
                                           (0.0456789, "45.7")])
def test_ms3_three_significant_figures(dev, seconds, text):
    assert dev.ms3(seconds) == text


def test_steady_rounds_adds_rounds_only_while_spread_is_high(dev):
    noisy = iter([1.0, 1.3, 1.0, 1.0, 1.0])
    calls = {"steady": 0}

    def steady():
        calls["steady"] += 1
        return 2.0

    times = dev.steady_rounds({"steady": steady, "noisy": lambda: next(noisy)}, rounds=2, max_rounds=6)
    # two rounds: noisy spread (1.15 - 1) / 1 = 15 % -> a third round brings its median back to 1.0
    assert times["noisy"] == [1.0, 1.3, 1.0]
    assert calls["steady"] == 3
    assert dev.spread(times["noisy"]) == 0.0


def test_steady_rounds_is_bounded(dev):
    values = iter(range(1, 20))  # ever slower: the spread never comes down
    times = dev.steady_rounds({"x": lambda: float(next(values))}, rounds=2, max_rounds=4)
    assert times["x"] == [1.0, 2.0, 3.0, 4.0]
    assert dev.spread(times["x"]) > dev.SPREAD_GOAL


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA H100 NVL", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops_by_card_name(dev, monkeypatch, name, peak):
    monkeypatch.setattr(dev.torch.cuda, "get_device_name", lambda device=None: name)
    assert dev.peak_tflops("cuda") == peak
    assert dev.peak_tflops("cpu") is None


class _Exited:
    """A bench process that has exited with status 0."""

    def wait(self, timeout=None):
        return 0


class _Pumped:
    """Its output thread, done."""

    def join(self, timeout=None):
        pass


def _fake_comfyui(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_needed_modules_follow_the_comfyui_in_use(run_all, tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "NEEDS", (
        ("zz_always_missing", "zz-always", "the benches", ""),
        ("zz_kitchen", "zz-kitchen", "attention", "comfy/ldm/modules/attention.py"),
        ("zz_sde_dep", "zz-dep", "torchsde", ("comfy/k_diffusion/sampling.py", "torchsde")),
        ("json", "stdlib", "present", ""),
    ))
    monkeypatch.setattr(run_all, "SERVER_NEEDS", (("zz_server", "zz-server", "server.py", "server.py"),))
    old = _fake_comfyui(tmp_path / "old", {"comfy/ldm/modules/attention.py": "import torch\n",
                                            "comfy/k_diffusion/sampling.py": "import torchsde\n"})
    new = _fake_comfyui(tmp_path / "new", {"comfy/ldm/modules/attention.py": "import zz_kitchen\n",
                                            "server.py": "import zz_server\n"})
    assert [m.split(" ")[0] for m in run_all.missing_modules(old, server=True)] == ["zz_always_missing", "zz_sde_dep"]
    assert [m.split(" ")[0] for m in run_all.missing_modules(new, server=False)] == ["zz_always_missing", "zz_kitchen"]
    assert [m.split(" ")[0] for m in run_all.missing_modules(new, server=True)] == \
        ["zz_always_missing", "zz_kitchen", "zz_server"]
    assert "pip zz-kitchen; attention" in run_all.missing_modules(new, server=False)[1]


def test_check_installed_names_everything_missing_in_one_line(run_all, tmp_path, monkeypatch):
    comfy = _fake_comfyui(tmp_path / "ComfyUI", {"comfy/model_patcher.py": "", "server.py": "import zz_server\n"})
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    monkeypatch.setattr(run_all, "NEEDS", (("zz_a", "zz-a", "x", ""), ("zz_b", "zz-b", "y", "")))
    monkeypatch.setattr(run_all, "SERVER_NEEDS", (("zz_server", "zz-server", "server.py", "server.py"),))
    line = run_all.check_installed([b for b in run_all.BENCHES if b.name == "workflows"])
    assert "\n" not in line and all(m in line for m in ("zz_a", "zz_b", "zz_server"))
    line = run_all.check_installed([b for b in run_all.BENCHES if b.name == "builder"])
    assert "zz_server" not in line and "zz_a" in line
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    assert "no ComfyUI" in run_all.check_installed(run_all.BENCHES)


def test_summary_reads_phases_peak_and_workflows(run_all):
    dev = sys.modules["_device"]
    b = next(x for x in run_all.BENCHES if x.name == "workflows")
    res = run_all.Result(b, "cmd")
    res.output = [f"{run_all.WORKFLOW_PREFIX} a.json 3.2 s ok (1 image(s))", dev.phase_line(10.0, 4.5),
                  f"{dev.PEAK_PREFIX} 123 MiB (max RSS of the process, cpu)"]

    run_all._finish(_Exited(), res, _Pumped(), 0.0, None)
    assert (res.status, res.phases, res.peak) == ("ok", (10.0, 4.5), "123 MiB")
    text = run_all.summary([res], "cpu (fp32)", 20.0)
    assert "10.0" in text and "4.5" in text and "a.json 3.2 s ok" in text


def test_every_bench_has_a_gpu_limit_and_they_fit_the_budget(run_all):
    on_gpu = [b for b in run_all.BENCHES if not b.device_free]
    assert sum(b.gpu_limit_s for b in on_gpu) <= run_all.GPU_BUDGET_S
    assert {b.name for b in run_all.BENCHES} >= {"multi_unet", "gri", "dynamic_vram", "builder", "distill",
                                                  "condconv", "loader", "lora_coverage", "workflows"}
    assert all("quick" in b.args for b in run_all.BENCHES)


def test_a_gpu_only_check_that_skips_is_reported_skipped(run_all):
    b = next(x for x in run_all.BENCHES if x.name == "dynamic_vram")
    skipped, table = run_all.Result(b, "cmd"), run_all.Result(b, "cmd")
    skipped.output = ["dynamic VRAM check: skipped (no CUDA device here)"]
    table.output = ["sdxl: skipped rows are not a skipped check"]
    for r in (skipped, table):
        run_all._finish(_Exited(), r, _Pumped(), 0.0, None)
    assert (skipped.status, table.status) == ("skipped", "ok")


@pytest.mark.parametrize("device, cpu_flag, extra", [("cuda", False, []), ("cuda:1", False, ["--cuda-device", "1"]),
                                                     ("cpu", True, [])])
def test_workflow_server_runs_on_the_bench_device(run_all, tmp_path, monkeypatch, device, cpu_flag, extra):
    import comfy_server

    started = []

    class Started(Exception):
        pass

    def record(cmd, *args, **kwargs):
        started.append(list(cmd))
        raise Started

    monkeypatch.setattr(comfy_server.subprocess, "Popen", record)
    comfy = _fake_comfyui(tmp_path / "ComfyUI", {"comfy/model_patcher.py": ""})
    server = run_all._server(comfy, [], device)
    try:
        with pytest.raises(Started):
            server.start()
    finally:
        server.cleanup()
    cmd = started[0]
    assert ("--cpu" in cmd) == cpu_flag
    if extra:
        assert cmd[-len(extra):] == extra
    else:
        assert "--cuda-device" not in cmd
    assert comfy_server.subprocess.Popen is record  # the GPU server's own patch is gone after its start
