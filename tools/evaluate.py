"""Judge students against their teacher without a ComfyUI server: the engine of Evaluate Student
(``nodes/host/judging.py``, ``models/students/evaluate``) on ComfyUI as a library, one process or many under
``torchrun``.

    python tools/evaluate.py --teacher sd15.safetensors --student bk-sdm-small.safetensors \\
        --prompts prompts.txt --images-per-prompt 4 --out runs/eval

    torchrun --nproc-per-node=8 tools/evaluate.py ...        # each process generates its share of the images

Inputs: ``--teacher`` a full checkpoint (its MODEL, CLIP and VAE: the students are sampled with the teacher's text
encoder and decoded by its VAE), ``--student`` one or more UNet files of the same family (what Load Distilled UNet
reads), ``--prompts`` a text file with one prompt a line. Image ``k`` of every prompt uses seed ``--seed + k`` for
every model. Optional: ``--clip-vision`` (CLIP metrics), ``--inception`` (FID, KID, Inception Score) and
``--reference-stats`` (a pytorch-fid ``.npz``: the absolute FID).

What it writes under ``--out``: ``teacher/NNNNNN.png`` and ``<student>/NNNNNN.png`` (``<student>`` = the file's name
without extension; ``NNNNNN`` = prompt x images-per-prompt + k), a ``manifest.json`` in each folder (model file,
settings, prompts, seeds), and, once every image is there, ``metrics.json`` (keys as the node's, per student) and
``grid.png``. Under ``torchrun`` rank ``r`` of ``w`` generates the pairs ``i`` with ``i % w == r``; rank 0 computes
the metrics from all the files. Started again with the same command, a run generates only the images that are not
there yet (a killed run resumes); a folder whose manifest matches is reused, so the teacher's images (the expensive
half) are made once for any number of students, and a folder of other settings is refused, never overwritten.

Same images at any number of processes with ``--batch-size 1`` (the default). A larger batch groups images of one
prompt into one sampler run: the same images up to float rounding (GPU kernels are not batch-invariant);
ancestral and SDE samplers always run one image at a time (their per-step noise is drawn per batch).

Exit codes: 0 done, 2 bad input (the message names the flag or file and the fix), 130 stopped by a signal,
1 anything else.

The BK-SDM protocol (their ``scripts/eval_scores.sh``): 30K MS-COCO val2014 captions, one image each, 25 PNDM steps
(ComfyUI has no PNDM: use euler or dpmpp_2m at 25 steps), CFG 7.5, seed 1234, 512 px, FID against statistics of the
val2014 images at 256 px (resize the PNGs to 256 px and use ``python -m pytorch_fid``, or read ``fid_stats`` when
the images are made at 256 px), CLIP score with ViT-g-14.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostError, import_pack, setup_comfy  # noqa: E402

log = logging.getLogger("distilled_unets")

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_SIGNAL = 0, 1, 2, 130
TOOL = "tools/evaluate.py"
#: the engine's input names -> this script's flags (for error messages)
FLAGS = {"teacher": "--teacher", "student": "--student", "prompts": "--prompts",
         "images_per_prompt": "--images-per-prompt", "width": "--width", "height": "--height",
         "sampler": "--sampler", "scheduler": "--scheduler", "clip_vision": "--clip-vision",
         "inception": "--inception", "reference_stats": "--reference-stats", "out": "--out", "steps": "--steps",
         "batch_size": "--batch-size"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=TOOL, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Judge distilled students against their teacher: same prompts and seeds, 8-bit PNGs, "
                    "PSNR/SSIM, CLIP metrics, FID/KID/IS; headless, under torchrun on many GPUs. See the module "
                    "docstring.")
    m = ap.add_argument_group("models")
    m.add_argument("--teacher", required=True, help="the teacher: a full checkpoint (MODEL, CLIP and VAE)")
    m.add_argument("--student", required=True, nargs="+", help="one or more student UNet files of the same family")
    g = ap.add_argument_group("generation")
    g.add_argument("--prompts", required=True, help="a text file, one prompt a line")
    g.add_argument("--images-per-prompt", type=int, default=1, help="seeds per prompt (image k uses seed + k)")
    g.add_argument("--seed", type=int, default=1234, help="seed of image 0 of every prompt (BK-SDM: 1234)")
    rec = "unset: the first student's recommended value where its structure is a published model's, else"
    g.add_argument("--steps", type=int, help=f"sampling steps ({rec} 25)")
    g.add_argument("--cfg", type=float, help=f"classifier-free guidance ({rec} 7.5)")
    g.add_argument("--sampler", help=f"a ComfyUI sampler name ({rec} euler)")
    g.add_argument("--scheduler", help=f"a ComfyUI scheduler name ({rec} normal)")
    g.add_argument("--width", type=int, default=0,
                   help=f"image width, a multiple of 8 (0: {rec} the family's, 512 / 1024)")
    g.add_argument("--height", type=int, default=0, help=f"image height, a multiple of 8 (0: {rec} the family's)")
    g.add_argument("--negative", default="", help="negative prompt for every image")
    g.add_argument("--batch-size", type=int, default=1, help="images of one prompt per sampler run, per process")
    j = ap.add_argument_group("judging")
    j.add_argument("--clip-vision", help="a CLIP vision file (ViT-L/14, ViT-H/14, ViT-bigG/14): the CLIP metrics")
    j.add_argument("--inception", help="the FID Inception file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    j.add_argument("--reference-stats", help="pytorch-fid statistics (.npz, mu and sigma): the absolute FID")
    j.add_argument("--fid-size", type=int, default=0,
                   help="resize the images to this many pixels a side (PIL bicubic) before the Inception (BK-SDM: "
                        "256); 0: as saved")
    o = ap.add_argument_group("output and runtime")
    o.add_argument("--out", required=True, help="output folder (images, metrics.json, grid.png)")
    o.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when present (each rank on the GPU of its LOCAL_RANK), else the CPU")
    o.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    o.add_argument("--comfyui", help="the ComfyUI folder to use as a library (default: COMFYUI_PATH or ~/ComfyUI)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return ap.parse_args(argv)


def student_names(paths: list[str]) -> list[str]:
    """Folder names of the students: the file (or folder) name without extension, made unique and never
    'teacher'."""
    out = []
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(p.rstrip("/")).name)
        base = re.sub(r"\.(safetensors|sft|ckpt|pt|pth|bin)$", "", base) or "student"
        name, n = base, 1
        while name in out or name == "teacher":
            n += 1
            name = f"{base}_{n}"
        out.append(name)
    return out


def read_prompts(path: str) -> list[str]:
    from distilled_unets.models.students.evaluate.plan import read_prompt_file

    return read_prompt_file(path)


def load_teacher(path: str):
    """(MODEL, CLIP, VAE) of a full checkpoint, as Load Checkpoint makes them."""
    import comfy.sd
    from distilled_unets.models.students.evaluate import EvaluationError

    fix = "give a full checkpoint of the teacher (UNet, text encoder and VAE in one file, as Load Checkpoint reads)"
    if not os.path.isfile(path):
        raise EvaluationError("the teacher file does not exist", fix, path=path, input_name="teacher")
    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True, embedding_directory=None)
    except Exception as e:
        raise EvaluationError(f"ComfyUI cannot load it as a checkpoint ({type(e).__name__}: {str(e)[:160]})", fix,
                              path=path, input_name="teacher") from e
    model, clip, vae = out[:3]
    if model is None or clip is None or vae is None:
        raise EvaluationError("the file lacks the text encoder or the VAE", fix, path=path, input_name="teacher")
    return model, clip, vae


def evaluate(args, rank: int, world: int, device: torch.device) -> int:
    from distilled_unets.models.errors import PackError
    from distilled_unets.models.students.distill import distributed
    from distilled_unets.models.students.evaluate import EvaluationError, load_inception, read_reference_stats
    from distilled_unets.models.students.evaluate import plan as P
    from distilled_unets.models.students.evaluate.inception import read_state_dict
    from distilled_unets.nodes.host import judging as J
    from distilled_unets.nodes.host.unet import load_distilled_unet

    t0 = time.perf_counter()
    prompts = read_prompts(args.prompts)
    for flag, path in [("teacher", args.teacher)] + [("student", s) for s in args.student]:
        if not os.path.exists(path):
            raise EvaluationError("the file does not exist", "give the path of a model file", path=path,
                                  input_name=flag)
    # the judging files, checked by rank 0 before any model loads or image is made
    checked = None
    if rank == 0:
        try:
            if args.reference_stats and not args.inception:
                raise EvaluationError("--reference-stats without --inception", "give the Inception file the "
                                      "statistics were made with", input_name="inception")
            if args.inception:
                read_state_dict(args.inception, input_name="inception")
            if args.reference_stats:
                read_reference_stats(args.reference_stats)
            if args.clip_vision:
                J.check_clip_vision(args.clip_vision, input_name="clip_vision")
            checked = {}
        except EvaluationError as e:
            checked = {"error": e}
    checked = distributed.broadcast_object(checked)
    if "error" in checked:
        raise checked["error"]
    teacher, clip, vae = load_teacher(args.teacher)
    names = student_names(args.student)
    students = {}
    for name, path in zip(names, args.student):
        try:
            students[name], _ = load_distilled_unet(path, "default", disable_dynamic=True)
        except EvaluationError:
            raise
        except PackError as e:
            e.input_name, e.path = "student", e.path or path
            raise
    try:
        fam = J.check_students(teacher, students, TOOL)
    except EvaluationError as e:
        if e.input_name in students:
            e.path = args.student[names.index(e.input_name)]
            e.input_name = "student"
        raise
    if args.steps is not None and args.steps < 1:
        raise EvaluationError(f"--steps {args.steps}", "give 1 or more (or leave it out: the student's recommended)",
                              input_name="steps")
    v, settings_note = J.resolve_settings(students, fam, TOOL, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                                          scheduler=args.scheduler, width=args.width, height=args.height)
    for flag, value in (("batch_size", args.batch_size), ("images_per_prompt", args.images_per_prompt)):
        if value < 1:
            raise EvaluationError(f"{FLAGS[flag]} {value}", "give 1 or more", input_name=flag)
    s = J.Settings(**v, negative=args.negative, seed=args.seed, images_per_prompt=args.images_per_prompt,
                   batch_size=args.batch_size)
    ids = {"teacher": P.file_identity(args.teacher), **{n: P.file_identity(p) if os.path.isfile(p) else {"path": p}
                                                         for n, p in zip(names, args.student)}}
    clip_vision = net = stats = None
    if rank == 0:
        if args.clip_vision:
            clip_vision = J.load_clip_vision(args.clip_vision, input_name="clip_vision")
        if args.inception:
            net = load_inception(args.inception, device=device)
        if args.reference_stats:
            stats = read_reference_stats(args.reference_stats)
    out = os.path.abspath(args.out)
    n_mine = len(P.share(P.pairs(len(prompts), s.images_per_prompt, s.seed), rank, world)) * (1 + len(students))
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=n_mine, unit="img", desc="evaluate", file=sys.stderr, dynamic_ncols=True)
    done = [0, 0]  # images, the count at the last log line

    def progress(n):
        done[0] += n
        if bar is not None:
            bar.update(n)
        elif rank == 0 and (done[0] - done[1] >= max(1, n_mine // 10) or done[0] == n_mine):
            done[1] = done[0]
            log.info("%d/%d images (this process)", done[0], n_mine)

    if rank == 0:
        log.info("teacher %s; students %s; %d prompts x %d images; %d process(es) on %s",
                 os.path.basename(args.teacher), ", ".join(names), len(prompts), s.images_per_prompt, world,
                 device.type)
    try:
        outcome = J.run_evaluation(teacher, students, clip, vae, prompts, s, out, model_ids=ids,
                                   clip_vision=clip_vision, inception=net,
                                   inception_note=os.path.basename(args.inception or ""),
                                   inception_size=args.fid_size,
                                   reference_stats=stats, stats_note=os.path.basename(args.reference_stats or ""),
                                   settings_note=settings_note,
                                   node=TOOL, rank=rank, world=world, progress=progress, barrier=distributed.barrier)
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        sys.stdout.write(outcome.report + "\n")
        log.info("wrote %s and %s (%.1f s)", os.path.join(out, "metrics.json"), os.path.join(out, "grid.png"),
                 time.perf_counter() - t0)
    return EXIT_OK


def main(argv=None, *, own_logging: bool = True) -> int:
    """Run the evaluation; returns the exit code. ``own_logging`` False leaves logging as the caller set it up."""
    args = parse_args(argv)
    import_pack()  # the host-free parts import without ComfyUI (which must see this rank's GPU when it loads)
    from distilled_unets.models.errors import PackError
    from distilled_unets.models.students.distill import launch

    started = launch.start(args.device, args.threads, own_logging)
    if started is None:
        return EXIT_BAD_INPUT
    rank, world, device = started
    try:
        setup_comfy(args.comfyui, cpu=device.type != "cuda")
    except HostError as e:
        log.error("error: %s", e)
        return EXIT_BAD_INPUT
    code = EXIT_ERROR
    try:
        code = evaluate(args, rank, world, device)
    except PackError as e:
        launch.name_error(e, TOOL, FLAGS)
        log.error("error: %s", e)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.warning("stopped: the same command continues with the images not written yet")
        code = EXIT_SIGNAL
    finally:
        launch.end_process_group(code == EXIT_OK)
    return code


if __name__ == "__main__":
    sys.exit(main())
