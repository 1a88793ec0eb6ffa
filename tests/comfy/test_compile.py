"""Host tests (real ComfyUI, CPU, tiny random UNets): ComfyUI's TorchCompileModel with multi-UNet MODELs.

The node is applied as a user would: to the early UNet or the late UNet before MultiUNetModel, or to
the multi-UNet MODEL. The node's own code runs; only its backend is a registered one that counts what
dynamo compiles and how often each compiled graph runs, and delegates to ``aot_eager`` (inductor would
need minutes of C++ compiling on this CPU; the graphs and guards are dynamo's either way). Checked: the
early UNet runs exactly the early steps and the late one the late steps, each compiled UNet's graphs run
in its own steps only, the result equals the uncompiled one, nothing compiles after a stage's first
call, and a second sampler run with new noise and a new schedule (other sigma values, so a guard on a
per-step value would recompile) compiles nothing new. Both ComfyUI versions: 0.33's node filters the
guards on transformer_options, 0.3.64's does not.
"""

from __future__ import annotations

import pytest
import torch

STEPS = 4
SWITCH = 0.5


class CountingBackend:
    """A dynamo backend registered under ``name``: counts compilations and graph executions, runs aot_eager."""

    def __init__(self, name: str):
        import torch._dynamo

        self.name = name
        self.compiled = 0
        self.executed = 0
        if name not in torch._dynamo.list_backends(exclude_tags=()):
            torch._dynamo.register_backend(name=name)(self)
        else:  # registered by an earlier test module run in this process: point the name at this counter
            from torch._dynamo.backends import registry

            registry._COMPILER_FNS[name] = self

    def __call__(self, gm, example_inputs):
        import torch._dynamo

        self.compiled += 1
        inner = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            self.executed += 1
            return inner(*args)

        return run


@pytest.fixture
def host(tm, monkeypatch):
    """ComfyUI's GPU attention (torch SDPA) instead of its CPU default (sub-quadratic attention reads the
    free memory through psutil in every call, a graph break that only slows compiling), dynamo reset."""
    import comfy.ldm.modules.attention as attn
    import torch._dynamo

    monkeypatch.setattr(attn, "optimized_attention", attn.attention_pytorch)
    torch._dynamo.reset()
    torch.set_num_threads(1)
    yield tm
    torch._dynamo.reset()


def _spy(patcher, calls: list, tag: str, backends: dict):
    """Record (tag, sigma, graph runs per backend during the call) of every forward of ``patcher``, from a
    keyed APPLY_MODEL wrapper: plain Python outside the compiled module, it never enters a graph."""
    import comfy.patcher_extension as pe

    def wrapper(executor, *args, **kwargs):
        t = args[1] if len(args) > 1 else kwargs["t"]
        ran = {k: b.executed for k, b in backends.items()}
        made = sum(b.compiled for b in backends.values())
        out = executor(*args, **kwargs)
        calls.append((tag, float(t.reshape(-1)[0]), {k: b.executed - ran[k] for k, b in backends.items()},
                      sum(b.compiled for b in backends.values()) - made))
        return out

    patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_compile_spy", wrapper)
    return patcher


# two sampler runs: new noise and a new schedule (other sigma values), same shapes
RUNS = [(3, "karras"), (4, "normal")]


def _sample(model, seed, scheduler):
    import _tiny_models as tm
    import comfy.sample

    pos, neg = tm.conditioning("sd15")
    lat = tm.latent(8)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", scheduler, pos, neg, lat, seed=seed,
                               disable_pbar=True)


def _compile(model, backend: str):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    res = TorchCompileModel.execute(model, backend)
    return res[0] if isinstance(res, tuple) else res.result[0]


# where TorchCompileModel goes -> {stage: the counting backend that compiles that stage's UNet}
PLACES = {"early": {"early": "early"},            # on the early UNet, before MultiUNetModel
          "late": {"late": "late"},               # on the late UNet, before MultiUNetModel
          "both": {"early": "early", "late": "late"},
          "multi": {"late": "multi"}}             # on the multi-UNet MODEL: its own UNet is the late one


@pytest.mark.parametrize("where", list(PLACES))
def test_compiled_unets_keep_their_steps_and_compile_once(host, where):
    import comfy.samplers
    from distilled_unets.nodes.sampling import MultiUNetModel
    from torch._dynamo.utils import counters

    tm = host
    backends = {w: CountingBackend(f"distilled_unets_count_{w}") for w in ("early", "late", "multi")}
    stage_backend = PLACES[where]
    calls: list = []
    early = _spy(tm.build("sd15", tm.MINI_TOPOLOGY, seed=1), calls, "early", backends)
    late = _spy(tm.build("sd15", tm.MINI_TOPOLOGY, seed=2), calls, "late", backends)
    plain = MultiUNetModel.execute(early, late, SWITCH).result[0]
    ref = [_sample(plain, seed, scheduler) for seed, scheduler in RUNS]
    switch_sigma = late.get_model_object("model_sampling").percent_to_sigma(SWITCH)
    calls.clear()

    if "early" in stage_backend and where != "multi":
        early = _compile(early, f"distilled_unets_count_{stage_backend['early']}")
    if "late" in stage_backend and where != "multi":
        late = _compile(late, f"distilled_unets_count_{stage_backend['late']}")
    multi = MultiUNetModel.execute(early, late, SWITCH).result[0]
    if where == "multi":
        multi = _compile(multi, "distilled_unets_count_multi")

    for run, (seed, scheduler) in enumerate(RUNS):
        graphs = counters["stats"]["unique_graphs"]
        compiled = {k: b.compiled for k, b in backends.items()}
        out = _sample(multi, seed, scheduler)
        torch.testing.assert_close(out, ref[run], rtol=1e-4, atol=1e-4)
        # routing holds: the early UNet runs the steps above the switch sigma, the late one the rest
        sigmas = comfy.samplers.KSampler(late, STEPS, "cpu", "euler", scheduler).sigmas.tolist()[:-1]
        assert [t for t, *_ in calls] == ["early" if s > switch_sigma else "late" for s in sigmas], calls
        assert [s for _t, s, *_ in calls] == pytest.approx(sigmas, rel=1e-6)
        assert {t for t, *_ in calls} == {"early", "late"}
        # each compiled UNet's graphs run in its own steps and only there; an uncompiled stage runs none
        for tag, _sigma, ran, _made in calls:
            for name, n in ran.items():
                assert (n > 0) == (stage_backend.get(tag) == name), (where, tag, name, calls)
        # compiling happens in a stage's first call only: nothing in the routing changes per step
        seen: set = set()
        for tag, sigma, _ran, made in calls:
            assert tag not in seen or made == 0, f"{where}: recompiled at sigma {sigma:.3f} ({tag} UNet)"
            seen.add(tag)
        if run == 0:
            assert all(backends[name].compiled > 0 for name in stage_backend.values())
        else:  # a second sampler run (new noise, new sigmas, same shapes) compiles nothing new
            assert {k: b.compiled for k, b in backends.items()} == compiled, "recompiled in the second run"
            assert counters["stats"]["unique_graphs"] == graphs
        calls.clear()
