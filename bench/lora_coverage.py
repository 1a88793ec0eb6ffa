# ruff: noqa: T201  (bench scripts print their tables)
"""LoRA coverage table: our DistilledLoraLoader key map next to ComfyUI's own LoraLoader mapping.

For each student (full-size structure, built on the meta device through ComfyUI's own classes), each
LoRA origin (trained on the teacher / on the student itself) and each format, a LoRA on every
weight module is generated and both mappings are run on the same file:

* ours: ``models.patches.lora_keys.plan_lora`` (what the node hands to ``comfy.lora.load_lora``);
* ComfyUI: ``comfy.lora.model_lora_keys_unet`` + ``comfy.lora.load_lora`` + ``add_patches``, i.e.
  ``comfy.sd.load_lora_for_models``, with shape mismatches counted as ComfyUI would skip them at merge.

Columns: applied (shape fits), dropped (block removed / key not loaded), shape (mismatch), wrong
(applied to a block other than the one the structural correspondence names), unsure (applied where
the teacher correspondence is not published; ours holds those back by default).

    ~/venv/bin/python bench/lora_coverage.py [--formats kohya,peft] [--students bk-base,ssd-1b]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import _device
import torch
from _pack import ROOT, import_pack, setup_comfy  # noqa: E402

sys.path.insert(0, str(ROOT))


def _setup():
    setup_comfy(append=True)  # after ours: ComfyUI has its own top-level `tests` package
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import_pack()


STUDENTS = {  # name -> attribute of models.structure.structures
    "bk-base / small-sd": "BK_BASE", "bk-small": "BK_SMALL", "bk-tiny / tiny-sd": "BK_TINY",
    "ssd-1b": "SSD_1B", "vega": "VEGA", "koala-700m": "KOALA_700M",
}


def meta_model(topology):
    """ComfyUI's own model of ``topology``, full size, on the meta device."""
    from distilled_unets.nodes.host.unet import comfy_model

    with torch.device("meta"):
        return comfy_model(topology, torch.float32, device="meta")


def lora_on(shapes: dict, fmt: str):
    """A rank-1 LoRA on every module (meta-free small tensors; values do not matter here)."""
    from tests._lora_fixtures import applies, lora_for

    mods = {p: s for p, s in shapes.items() if applies(fmt, p, s)}
    t, meta, acfg, _ = lora_for(mods, fmt, rank=1)
    return t, meta, acfg


def implied(prefix, tensors):
    from distilled_unets.models.patches.lora_keys import implied_shape

    return implied_shape(prefix, tensors)


def count(mapping: dict, expected: dict, tensors: dict, sd_shapes: dict, n_modules: int):
    """mapping: prefix -> model key (what gets patched). expected: prefix -> key | None | '?'."""
    applied = shape = wrong = unsure = 0
    for prefix, key in mapping.items():
        imp = implied(prefix, tensors)
        w = sd_shapes.get(key)
        if w is None:
            continue
        if imp is not None and imp != (w[0], math.prod(w[1:])):
            shape += 1
            continue
        applied += 1
        exp = expected.get(prefix)
        if exp == "?":
            unsure += 1
        elif exp != key:
            wrong += 1
    dropped = n_modules - applied - shape
    return applied, dropped, shape, wrong, unsure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="kohya,kohya-ldm,diffusers-new,peft,loha")
    ap.add_argument("--students", default=",".join(STUDENTS))
    args = ap.parse_args()
    ph = _device.Phases()
    torch.set_num_threads(1)
    _setup()
    logging.disable(logging.WARNING)
    import comfy.lora
    from distilled_unets.models.patches import lora_keys as lk
    from distilled_unets.models.structure import names
    from distilled_unets.models.structure import structures as S
    from distilled_unets.models.structure.blockmap import CERTAIN, derive

    from tests._lora_fixtures import LDM_FORMATS

    teacher_models = {}
    hdr = (f"{'student':20} {'origin':8} {'format':14} | {'ours: applied':>13} {'dropped':>7} {'unsure-held':>11} "
           f"{'wrong':>5} | {'ComfyUI: applied':>16} {'dropped':>7} {'shape':>5} {'wrong':>5} {'unsure':>6}")
    print(hdr)
    print("-" * len(hdr))
    ph.measuring()  # the structures are built on the meta device inside the loop: all of it is the measurement
    for sname in args.students.split(","):
        student = getattr(S, STUDENTS[sname])
        teacher = S.TEACHERS[student.family]
        model = meta_model(student)
        sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        smap = names.module_map(student)
        if student.family not in teacher_models:
            teacher_models[student.family] = meta_model(teacher)
        tsd = teacher_models[student.family].state_dict()
        tmap = names.module_map(teacher)
        bm = derive(teacher, student)
        comfy_map = comfy.lora.model_lora_keys_unet(model, {})
        table = lk.underscore_table([student, teacher])
        for origin in ("teacher", "student"):
            src_map, src_sd = (tmap, tsd) if origin == "teacher" else (smap, model.state_dict())
            for fmt in args.formats.split(","):
                ldm = fmt in LDM_FORMATS
                shapes = {(v if ldm else k): tuple(src_sd[f"diffusion_model.{v}.weight"].shape)
                          for k, v in src_map.items()}
                tensors, meta, acfg = lora_on(shapes, fmt)
                prefixes = {lk.split_key(k)[0] for k in tensors}
                n = len(prefixes)
                # where each prefix belongs (structural correspondence)
                expected = {}
                for prefix in prefixes:
                    pm = lk.parse_prefix(prefix, table)
                    if origin == "student":
                        expected[prefix] = f"diffusion_model.{pm.path if pm.layout == 'ldm' else smap[pm.path]}.weight"
                        continue
                    s_mod, certainty, _ = bm.student_module(pm.path if pm.layout == "ldm" else tmap[pm.path])
                    if s_mod is None:
                        expected[prefix] = None
                    else:
                        expected[prefix] = f"diffusion_model.{s_mod}.weight" if certainty == CERTAIN else "?"
                plan = lk.plan_lora(tensors, student, sd_shapes, metadata=meta, adapter_config=acfg)
                ours = count(plan.to_load, expected, tensors, sd_shapes, n)
                loaded = comfy.lora.load_lora(tensors, comfy_map, log_missing=False)
                back = {v: k for k, v in comfy_map.items()}
                theirs_map = {}
                for key in loaded:
                    # recover which file prefix ComfyUI used for this key
                    cands = [p for p in prefixes if comfy_map.get(p) == key]
                    if cands:
                        theirs_map[cands[0]] = key
                    elif back.get(key) in prefixes:
                        theirs_map[back[key]] = key
                theirs = count(theirs_map, expected, tensors, sd_shapes, n)
                print(f"{sname:20} {origin:8} {fmt:14} | {ours[0]:>7}/{n:<5} {ours[1]:>7} {len(plan.uncertain):>11} "
                      f"{ours[3]:>5} | {theirs[0]:>10}/{n:<5} {theirs[1]:>7} {theirs[2]:>5} {theirs[3]:>5} "
                      f"{theirs[4]:>6}")
        print()
    print(ph.line())
    print(_device.peak_line("cpu"))


if __name__ == "__main__":
    main()
