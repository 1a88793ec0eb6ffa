"""Host tests (real ComfyUI, CPU, tiny random UNets): the loader builds the model patcher ComfyUI itself
would build and loads weights as ``comfy.sd`` does; multi-UNet routing with dynamic, legacy and mixed stages.

Newer ComfyUI builds ``comfy.model_patcher.CoreModelPatcher`` (rebound to ``ModelPatcherDynamic`` by
``main.py`` on NVIDIA) and loads with ``assign=patcher.is_dynamic()``. On a CPU a real dynamic patcher
cannot exist (``ModelPatcherDynamic`` reroutes to ``ModelPatcher`` for a CPU load device, and dynamic VRAM
needs CUDA), so the dynamic side here is a stand-in: a ``ModelPatcher`` subclass that reports
``is_dynamic()`` (ComfyUI 0.33's memory management then takes its dynamic branches) and records how it
was built. What only a GPU shows is the dynamic-VRAM check of ``bench/run_all.py``.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from safetensors.torch import save_file

from ..layouts import diffusers_model, tiny_config


@pytest.fixture(scope="module")
def student_sd():
    """A tiny random tiny-sd (BK-SDM-Tiny structure) UNet in diffusers layout."""
    from distilled_unets.models.structure.registry import by_id
    from distilled_unets.models.structure.topology import diffusers_config

    m = diffusers_model(tiny_config(diffusers_config(by_id("segmind/tiny-sd").structure)))
    return {k: v.contiguous() for k, v in m.state_dict().items()}


@pytest.fixture
def student_file(tmp_path, student_sd):
    path = tmp_path / "tiny-sd-student.safetensors"
    save_file(student_sd, str(path))
    return str(path)


def _stand_in(dynamic: bool):
    """A fresh ModelPatcher subclass standing in for ComfyUI's CoreModelPatcher: records every build."""
    import comfy.model_patcher

    class StandIn(comfy.model_patcher.ModelPatcher):
        built: list = []
        loads: list = []

        def __init__(self, model, load_device, offload_device, *args, **kwargs):
            super().__init__(model, load_device, offload_device, *args, **kwargs)
            StandIn.built.append((model, load_device, offload_device))

        def is_dynamic(self):
            return dynamic

        def load(self, *args, **kwargs):
            StandIn.loads.append(self)
            return super().load(*args, **kwargs)

    StandIn.__name__ = "DynamicStandIn" if dynamic else "LegacyStandIn"
    return StandIn


@pytest.fixture
def record_load_weights(monkeypatch):
    """kwargs of every BaseModel.load_model_weights call (the wrapper keeps the host's signature)."""
    import comfy.model_base

    calls: list = []
    original = comfy.model_base.BaseModel.load_model_weights

    @functools.wraps(original)
    def recording(self, sd, unet_prefix="", **kwargs):
        calls.append(dict(kwargs))
        return original(self, sd, unet_prefix, **kwargs)

    monkeypatch.setattr(comfy.model_base.BaseModel, "load_model_weights", recording)
    return calls


def _host_takes_assign() -> bool:
    import comfy.model_base

    return "assign" in inspect.signature(comfy.model_base.BaseModel.load_model_weights).parameters


def _build(sd):
    """The pack's build from a state dict (what load_distilled_unet calls after reading the file)."""
    from distilled_unets.models.structure.detect import detect
    from distilled_unets.nodes.host.unet import build_model

    det = detect({k: tuple(v.shape) for k, v in sd.items()})
    n = len(det.prefix)
    ldm = {det.key_map[k[n:]]: v for k, v in sd.items() if k.startswith(det.prefix) and k[n:] in det.key_map}
    return build_model(det.topology, ldm)


def _a_weight(patcher, sd):
    """(the module's conv_in weight, the state-dict tensor it was loaded from)."""
    return patcher.model.diffusion_model.input_blocks[0][0].weight, sd["conv_in.weight"]


def _sample(model, steps=4, seed=3):
    import _tiny_models as tm
    import comfy.sample

    pos, neg = tm.conditioning("sd15")
    lat = tm.latent(8)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, 5.0, "dpmpp_2m", "karras", pos, neg, lat, seed=seed,
                               disable_pbar=True)


# ------------------------------------------------------------------------------------------------
# which patcher, how the weights go in


def test_loader_builds_the_hosts_current_patcher_class(student_file, record_load_weights):
    import comfy.model_patcher
    from distilled_unets.nodes.host.patcher import is_dynamic, patcher_class
    from distilled_unets.nodes.host.unet import load_distilled_unet

    p, _ = load_distilled_unet(student_file)
    expected = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    assert patcher_class() is expected and type(p) is expected
    assert not is_dynamic(p)  # CPU: never dynamic
    assert record_load_weights == [{}]  # a legacy patcher: copied in, no assign (0.3.64 has no such argument)


def test_dynamic_patcher_is_built_and_gets_its_weights_assigned(monkeypatch, student_file, student_sd,
                                                               record_load_weights):
    """With CoreModelPatcher rebound to a dynamic patcher (what main.py does on NVIDIA), the loader builds
    that class once, with ComfyUI's load and offload devices, and loads with assign=True where the host's
    load_model_weights takes it (the module then holds the state-dict tensors themselves)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from distilled_unets.nodes.host.unet import load_distilled_unet

    dyn = _stand_in(dynamic=True)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dyn, raising=False)
    p, _ = load_distilled_unet(student_file)
    assert type(p) is dyn and dyn.built == [(p.model, mm.get_torch_device(), mm.unet_offload_device())]
    assert record_load_weights == ([{"assign": True}] if _host_takes_assign() else [{}])

    record_load_weights.clear()
    p = _build(student_sd)
    weight, source = _a_weight(p, student_sd)
    if _host_takes_assign():
        assert record_load_weights == [{"assign": True}] and weight.data_ptr() == source.data_ptr()
    else:  # 0.3.64: no assign; copied, and nothing fails
        assert record_load_weights == [{}] and weight.data_ptr() != source.data_ptr()
    assert torch.equal(weight, source)


def test_legacy_patcher_copies_weights(student_sd, record_load_weights):
    p = _build(student_sd)
    weight, source = _a_weight(p, student_sd)
    assert record_load_weights == [{}] and weight.data_ptr() != source.data_ptr() and torch.equal(weight, source)


def test_disable_dynamic_and_hosts_without_core_model_patcher(monkeypatch, tm):
    import comfy.model_management as mm
    import comfy.model_patcher
    from distilled_unets.nodes.host.patcher import is_dynamic, new_patcher, patcher_class, set_reload

    base = tm.build("sd15", seed=0)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", _stand_in(dynamic=True), raising=False)
    p = new_patcher(base.model, mm.get_torch_device(), mm.unet_offload_device(), disable_dynamic=True)
    assert type(p) is comfy.model_patcher.ModelPatcher and not is_dynamic(p)
    monkeypatch.delattr(comfy.model_patcher, "CoreModelPatcher")  # a host without it (0.3.64)
    assert patcher_class() is comfy.model_patcher.ModelPatcher
    assert is_dynamic(object()) is False

    def reload(path, disable_dynamic=False):
        return p

    set_reload(p, reload, ("a.safetensors",), 0)
    if hasattr(p, "cached_patcher_init"):  # 0.33: multi-GPU deep clones and the non-dynamic delegate read it
        assert p.cached_patcher_init == (reload, ("a.safetensors",), 0)
        assert p.clone().cached_patcher_init == p.cached_patcher_init


def test_model_patcher_dynamic_reroutes_to_a_working_model_patcher_on_cpu(monkeypatch, student_file):
    """main.py's rebinding on a host that has ModelPatcherDynamic: on a CPU load device the pack still
    gets a working legacy patcher, and it samples exactly like the plain build."""
    import comfy.model_patcher
    from distilled_unets.nodes.host.unet import load_distilled_unet

    dynamic_cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic_cls is None:
        pytest.skip("this ComfyUI has no ModelPatcherDynamic (dynamic VRAM came later)")
    plain, _ = load_distilled_unet(student_file)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dynamic_cls)
    p, _ = load_distilled_unet(student_file)
    assert type(p) is comfy.model_patcher.ModelPatcher and not p.is_dynamic()
    assert torch.equal(_sample(plain), _sample(p))


# ------------------------------------------------------------------------------------------------
# multi-UNet routing across patcher classes


def _spy(patcher, log: list, tag: str):
    import comfy.patcher_extension as pe

    def wrapper(executor, *args, **kwargs):
        to = args[5] if len(args) > 5 else kwargs["transformer_options"]
        log.append((tag, float(to["sigmas"].reshape(-1)[0])))
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", wrapper)
    return patcher


@pytest.mark.parametrize("early_dynamic,late_dynamic", [(True, False), (False, True), (True, True)],
                         ids=["dynamic-student+legacy-teacher", "legacy-student+dynamic-teacher", "both-dynamic"])
def test_multi_unet_routes_with_dynamic_legacy_and_mixed_stages(monkeypatch, tm, student_file, early_dynamic,
                                                                late_dynamic):
    """A student from the pack's loader and a teacher from ComfyUI's classes, each built by a dynamic or a
    legacy patcher class: every early step runs the student, every late one the teacher; clones keep
    their class; both are loaded for the run."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from distilled_unets.nodes.host.unet import load_distilled_unet
    from distilled_unets.nodes.sampling import MultiUNetModel

    legacy = comfy.model_patcher.ModelPatcher
    dyn = _stand_in(dynamic=True)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dyn if early_dynamic else legacy, raising=False)
    student, _ = load_distilled_unet(student_file)
    teacher_base = tm.build("sd15", seed=2)
    late_cls = dyn if late_dynamic else legacy
    teacher = late_cls(teacher_base.model, teacher_base.load_device, teacher_base.offload_device)
    assert type(student) is (dyn if early_dynamic else legacy)

    calls: list = []
    multi = MultiUNetModel.execute(_spy(student.clone(), calls, "early"), _spy(teacher.clone(), calls, "late"),
                                   0.5).result[0]
    from distilled_unets.models.patches.multi_unet import stage_patchers

    (_, routing), (_, early_stage) = stage_patchers(multi)
    assert type(routing) is late_cls and type(early_stage) is type(student) and type(multi.clone()) is late_cls
    dyn.loads.clear()
    out = _sample(multi, steps=6)
    assert torch.isfinite(out).all()
    switch = teacher.get_model_object("model_sampling").percent_to_sigma(0.5)
    early = [s for t, s in calls if t == "early"]
    late = [s for t, s in calls if t == "late"]
    assert early and late and min(early) > switch >= max(late)
    loaded = [p.model for p in mm.loaded_models()]
    assert any(m is student.model for m in loaded) and any(m is teacher.model for m in loaded)
    assert {id(p.model) for p in dyn.loads} == {id(p.model) for p, d in ((student, early_dynamic),
                                                                          (teacher, late_dynamic)) if d}


# ------------------------------------------------------------------------------------------------
# layers built lazily while dynamic VRAM is on


@pytest.fixture
def lazy_layers(monkeypatch):
    """ComfyUI's ops as they are built while dynamic VRAM is on (``comfy.memory_management.aimdo_enabled``):
    Linear / Embedding without weights until loaded. Only model construction and loading are run so."""
    import importlib

    try:
        mem = importlib.import_module("comfy.memory_management")
    except ImportError:
        mem = None
    if not hasattr(mem, "aimdo_enabled"):
        pytest.skip("this ComfyUI has no dynamic VRAM (no lazily built layers)")
    monkeypatch.setattr(mem, "aimdo_enabled", True)
    return mem


def test_expected_shapes_include_lazily_built_weights(lazy_layers, student_sd):
    from distilled_unets.models.structure.detect import detect
    from distilled_unets.nodes.host.patcher import expected_shapes
    from distilled_unets.nodes.host.unet import comfy_model

    det = detect({k: tuple(v.shape) for k, v in student_sd.items()})
    lazy = comfy_model(det.topology, torch.float32).diffusion_model
    lazy_layers.aimdo_enabled = False
    eager = comfy_model(det.topology, torch.float32).diffusion_model
    want = {k: tuple(v.shape) for k, v in eager.state_dict().items()}
    assert len(lazy.state_dict()) < len(want)  # what a check reading state_dict() alone would miss
    assert expected_shapes(lazy) == want and expected_shapes(eager) == want


def test_loader_builds_with_lazily_built_layers(lazy_layers, student_sd):
    p = _build(student_sd)  # the pack's build from the tensors (reading files is aimdo's own business)
    weight = p.model.diffusion_model.input_blocks[1][1].proj_in.weight
    assert weight is not None and torch.equal(weight, student_sd["down_blocks.0.attentions.0.proj_in.weight"])
