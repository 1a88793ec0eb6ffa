# ruff: noqa: T201  (bench scripts print their tables)
"""Bench: what judging a student costs next to generating the images it judges, at 64 image pairs.

Generation: the full-size SD 1.5 teacher and a bk-tiny student (random weights, ComfyUI's own UNets built on the
device), one UNet call each at batch 2 (CFG) and ``--px``, timed interleaved; one image of each model costs
``--steps`` such calls (the VAE decode is left out: it only adds to generation). The metrics, on 64 pairs of
8-bit ``--px`` images: PSNR / SSIM / MS-SSIM (torchmetrics), CLIP ViT-L/14 image embeddings (ComfyUI's
``ClipVisionModel`` from its ``clip_vision_config_vitl.json``, random weights) and Inception pool3 + logits (the
FID Inception, random weights) of all 128 images, then ``judge`` with every figure and its bootstrap interval
(fd_clip, kid_clip, cmmd, fid, kid, inception score). Feature extraction is timed on ``--feature-images`` images
and scaled to 128 (on a CPU a ViT-L pass over 128 images takes minutes); the rest runs at 64 pairs.

The goal: the metrics at most 5 % of the whole (generation + metrics).

    python bench/bench_evaluate.py [--px 512] [--steps 25] [--feature-images 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import _device
from _pack import import_pack, random_unet, setup_comfy  # noqa: E402

PAIRS = 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25, help="sampling steps per image (BK-SDM: 25)")
    ap.add_argument("--feature-images", type=int, default=2 * PAIRS,
                    help="images the CLIP and Inception passes are timed on (scaled to 128)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the two UNet calls")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA in fp16 when there, else CPU fp32)")
    a = ap.parse_args(argv)
    ph = _device.Phases()
    dev, dtype = _device.setup(a.device)
    setup_comfy()
    import_pack()
    import comfy.clip_vision
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from distilled_unets.models.structure import structures as S
    from distilled_unets.models.students.evaluate import ImageSet, InceptionFeatures, judge
    from distilled_unets.models.students.evaluate import metrics as M
    from distilled_unets.models.students.evaluate.inception import features_in_batches

    print(f"{_device.describe(dev, dtype)}; {PAIRS} image pairs at {a.px} px, {a.steps} steps x CFG (batch 2)")
    # --- generation: one UNet call of each model
    lat = a.px // 8
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 4, lat, lat, generator=g, device=dev, dtype=dtype)
    ts = torch.tensor([500.0, 500.0], device=dev)
    ctx = torch.randn(2, 77, 768, generator=g, device=dev, dtype=dtype)
    nets = {"teacher SD 1.5": random_unet(S.SD1, dtype, dev, 0).diffusion_model,
            "student bk-tiny": random_unet(S.BK_TINY, dtype, dev, 1).diffusion_model}

    def call(net):
        def fn():
            with torch.no_grad():
                _device.sync(dev)
                t0 = time.perf_counter()
                net(x, timesteps=ts, context=ctx)
                _device.sync(dev)
            return time.perf_counter() - t0
        return fn

    fns = {k: call(v) for k, v in nets.items()}
    for fn in fns.values():
        fn()
    ph.measuring()
    times = _device.steady_rounds(fns, a.rounds, 3 * a.rounds)
    ph.setting_up()
    per_call = {k: statistics.median(v) for k, v in times.items()}
    gen_s = PAIRS * a.steps * sum(per_call.values())
    del nets, fns
    import gc

    gc.collect()
    # --- the metrics' networks, random, full size
    cfg = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    cv = comfy.clip_vision.ClipVisionModel(cfg)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in cv.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    import torchvision

    inc_sd = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False,
                                                     init_weights=False).state_dict()
    inception = InceptionFeatures(inc_sd).to(dev)
    gu = torch.Generator().manual_seed(3)
    teacher_u8 = (torch.rand(PAIRS, a.px, a.px, 3, generator=gu) * 255).to(torch.uint8)
    student_u8 = (teacher_u8.int() + torch.randint(-20, 21, teacher_u8.shape, generator=gu)).clamp(0, 255) \
        .to(torch.uint8)
    n_feat = max(1, min(a.feature_images, 2 * PAIRS))
    feat_imgs = torch.cat([teacher_u8, student_u8])[:n_feat]

    def clip_pass():
        out = []
        for s in range(0, n_feat, 16):
            with torch.no_grad():
                out.append(cv.encode_image(feat_imgs[s:s + 16].float() / 255.0)["image_embeds"].float().cpu())
        return torch.cat(out)

    cv.encode_image(feat_imgs[:1].float() / 255.0)  # warm-up (loads the model on the device)
    inception(feat_imgs[:1])
    rows = {}
    ph.measuring()
    t0 = time.perf_counter()
    emb = clip_pass()
    rows["CLIP ViT-L/14 embeddings (128 images)"] = (time.perf_counter() - t0) * 2 * PAIRS / n_feat
    t0 = time.perf_counter()
    pool, logits = features_in_batches(inception, feat_imgs, batch=16)
    rows["Inception pool3 + logits (128 images)"] = (time.perf_counter() - t0) * 2 * PAIRS / n_feat
    t0 = time.perf_counter()
    M.pair_scores(teacher_u8, student_u8, device=dev)
    rows["PSNR / SSIM / MS-SSIM (64 pairs)"] = time.perf_counter() - t0
    ph.setting_up()
    # judge at 64 pairs with features of the real widths (the extracted ones, repeated to 64 per side)
    def grow(f, n):
        reps = (2 * n + f.shape[0] - 1) // f.shape[0]
        return f.repeat(reps, 1)[:2 * n] + 1e-3 * torch.randn(2 * n, f.shape[1], generator=gu)

    emb, pool, logits = grow(emb, PAIRS), grow(pool, PAIRS), grow(logits, PAIRS)
    tset = ImageSet(teacher_u8, clip=emb[:PAIRS], pool=pool[:PAIRS], logits=logits[:PAIRS])
    sset = ImageSet(student_u8, clip=emb[PAIRS:], pool=pool[PAIRS:], logits=logits[PAIRS:])
    text = torch.randn(PAIRS, emb.shape[1], generator=gu)
    ph.measuring()
    t0 = time.perf_counter()
    j = judge(tset, sset, text=text, seed=0, device=dev)
    rows["judge: every figure + intervals (64 pairs, PSNR/SSIM included)"] = time.perf_counter() - t0
    ph.setting_up()
    metric_s = sum(v for k, v in rows.items() if not k.startswith("PSNR"))  # judge includes the pair scores
    total = gen_s + metric_s
    print(f"{'part':58} {'seconds':>9} {'share':>7}")
    for k, v in per_call.items():
        print(f"{'generation: ' + k + ' (one call)':58} {v:>9.3f}")
    print(f"{'generation: 64 pairs x ' + str(a.steps) + ' steps (both models)':58} {gen_s:>9.1f} "
          f"{gen_s / total:>7.1%}")
    for k, v in rows.items():
        note = "  (inside judge)" if k.startswith("PSNR") else ""
        print(f"{'metrics: ' + k:58} {v:>9.2f} {v / total:>7.2%}{note}")
    share = metric_s / total
    print(f"metrics' share of the whole: {share:.2%} (goal at most 5 %: {'met' if share <= 0.05 else 'NOT met'}); "
          f"figures computed: {', '.join(sorted(j.metrics))}")
    print("bench json: " + json.dumps({"px": a.px, "steps": a.steps, "generation_s": gen_s, "metrics_s": metric_s,
                                        "share": share, "feature_images_timed": n_feat}))
    print(ph.line())
    print(_device.peak_line(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
