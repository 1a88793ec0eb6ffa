"""LoRA coverage table: our DistilledLoraLoader key map next to ComfyUI's own LoraLoader mapping.

For each student (full-size structure, built on the meta device through ComfyUI's own classes), each
LoRA origin (trained on the teacher / on the student itself) and each format, a LoRA on every
weight module is generated and both mappings are run on the same file:

* ours: ``models.lora_keys.plan_lora`` (what the node hands to ``comfy.lora.load_lora``);
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

import torch

from _pack import ROOT, import_pack, setup_comfy  # noqa: E402
sys.path.insert(0, str(ROOT))


def _setup():
    setup_comfy(append=True)  # after ours: ComfyUI has its own top-level `tests` package
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import_pack()


SD1 = dict(context_dim=768)
STUDENTS = {
    "bk-base / small-sd": ("sd15", dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[1] * 4, transformer_depth=[1, 1, 1, 0],
                                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1)),
    "bk-small": ("sd15", dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[1] * 4, transformer_depth=[1, 1, 1, 0],
                              transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=-2)),
    "bk-tiny / tiny-sd": ("sd15", dict(channel_mult=[1, 2, 4], num_res_blocks=[1] * 3, transformer_depth=[1, 1, 1],
                                       transformer_depth_output=[1] * 6, transformer_depth_middle=-2)),
    "ssd-1b": ("sdxl", dict(channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 4, 4],
                            transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4], transformer_depth_middle=-1)),
    "vega": ("sdxl", dict(channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                          transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=-1)),
    "koala-700m": ("sdxl", dict(channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                                transformer_depth_output=[0, 0, 2, 2, 5, 5], transformer_depth_middle=-2)),
}


def meta_model(family: str, topo: dict):
    import comfy.model_base
    import comfy.supported_models as sm

    cfg = dict(topo, use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
               use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
    if family == "sdxl":
        cfg.update(context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
        mc, cls = sm.SDXL(cfg), comfy.model_base.SDXL
    else:
        cfg.update(context_dim=768, use_linear_in_transformer=False, adm_in_channels=None)
        mc, cls = sm.SD15(cfg), comfy.model_base.BaseModel
    mc.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        return cls(mc, device="meta")


def lora_on(shapes: dict, fmt: str):
    """A rank-1 LoRA on every module (meta-free small tensors; values do not matter here)."""
    from tests._lora_fixtures import applies, lora_for

    mods = {p: s for p, s in shapes.items() if applies(fmt, p, s)}
    t, meta, acfg, _ = lora_for(mods, fmt, rank=1)
    return t, meta, acfg


def implied(prefix, tensors):
    from distilled_unets.models.lora_keys import _implied_shape

    return _implied_shape(prefix, tensors)


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
    torch.set_num_threads(1)
    _setup()
    logging.disable(logging.WARNING)
    import comfy.lora

    from distilled_unets.models import lora_keys as lk
    from tests._lora_fixtures import LDM_FORMATS

    teachers = {"sd15": lk.SD1_TEACHER, "sdxl": lk.SDXL_TEACHER}
    teacher_models = {}
    hdr = (f"{'student':20} {'origin':8} {'format':14} | {'ours: applied':>13} {'dropped':>7} {'unsure-held':>11} "
           f"{'wrong':>5} | {'ComfyUI: applied':>16} {'dropped':>7} {'shape':>5} {'wrong':>5} {'unsure':>6}")
    print(hdr)
    print("-" * len(hdr))
    for sname in args.students.split(","):
        family, topo = STUDENTS[sname]
        model = meta_model(family, topo)
        sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        cfg = model.model_config.unet_config
        smap = lk.unet_module_map(cfg)
        if family not in teacher_models:
            teacher_models[family] = meta_model(family, {k: v for k, v in teachers[family].items()
                                                         if k != "adm_in_channels"})
        tmodel = teacher_models[family]
        tsd = tmodel.state_dict()
        tcfg = tmodel.model_config.unet_config
        tmap = lk.unet_module_map(tcfg)
        comfy_map = comfy.lora.model_lora_keys_unet(model, {})
        table = lk._underscore_table([cfg, tcfg])
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
                inv_t = {v: k for k, v in tmap.items()}
                expected = {}
                for prefix in prefixes:
                    pm = lk.parse_prefix(prefix, table)
                    if origin == "student":
                        expected[prefix] = f"diffusion_model.{pm.path if pm.layout == 'ldm' else smap[pm.path]}.weight"
                        continue
                    d = pm.path if pm.layout == "diffusers" else inv_t[pm.path]
                    outcome, s_d, _ = lk.translate_teacher_path(d, tcfg, cfg)
                    if outcome == lk.UNCERTAIN:
                        expected[prefix] = "?"
                    elif outcome == lk.MAPPED and s_d in smap:
                        expected[prefix] = f"diffusion_model.{smap[s_d]}.weight"
                    else:
                        expected[prefix] = None
                plan = lk.plan_lora(tensors, cfg, sd_shapes, metadata=meta, adapter_config=acfg)
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


if __name__ == "__main__":
    main()
