"""Run a shipped example workflow headless through ComfyUI's own executor and write its PNGs.

    python tools/run_workflow.py workflows/distilled_unet_sd15.json
    python tools/run_workflow.py --all --out my_images/

Starts a real ComfyUI server (``main.py --cpu`` on 127.0.0.1, a free port) with this pack loaded,
converts the UI-format workflow to the API format with the server's ``/object_info``, queues it,
waits for it, and copies the PNGs to ``--out`` as ``<workflow>_<saver prefix>_<counter>_.png``,
numbered like ComfyUI's own savers (a second run adds files, never replaces them).

Nothing is written into the ComfyUI installation: every folder the server writes to is under
``--out`` (default ``./distilled_unets_output/``): ``models/`` for the models a workflow saves (Save
Student UNet's student: ``models/diffusion_models/...``), ``output/`` for ComfyUI's own output (the
images as ComfyUI saved them, the distiller's checkpoints), and a ``.comfyui-*`` working folder (user,
input, temp, the server's log) removed when the run ends. The files a run saved are listed at the end.

The model files the workflow names are looked up in ComfyUI's own ``models/`` and in ``--models``; when
one is missing, tiny random DEMO weights are generated once (``tools/demo_weights.py``, into
``~/.cache/distilled_unets/demo-models``) and every model file in the workflow is swapped for its demo
counterpart, so the run exercises the whole pipeline but THE IMAGE IS NOISE. Client side: standard
library only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _host import REPO, find_comfyui, missing_reason
from comfy_server import ComfyServer, PromptRejected, ServerError, execution_error
from ui_to_api import ConversionError, convert

log = logging.getLogger("distilled_unets.tools")

#: the one cache of demo weights (the quick start and the server tests share it; never in ComfyUI's folders)
DEFAULT_DEMO_DIR = Path.home() / ".cache" / "distilled_unets" / "demo-models"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet", "loras", "vae", "text_encoders", "clip", "diffusers")
DEMO_STEPS, DEMO_SIZE = 4, (128, 128)
SDXL_HINT = re.compile(r"xl|koala|ssd-?1b|vega", re.I)

# (node type, input) -> demo file chooser: (original value, is_sdxl) -> demo name
def _demo_unet(value: str, sdxl: bool) -> str:
    import demo_weights as dw

    if sdxl:
        return dw.SDXL_STUDENT_FILE
    return dw.STUDENT_FOLDER if value.endswith("/") else dw.STUDENT_FILE


#: nodes that need a full-structure teacher (block removal reads every block of the real UNet)
TEACHER_NODES = ("BuildStudentUNet", "DistillStudentUNet")


def _demo_ckpt(value: str, sdxl: bool, teacher: bool = False) -> str:
    import demo_weights as dw

    if teacher and not sdxl:
        return dw.SD15_TEACHER_CKPT
    return dw.SDXL_CKPT if sdxl else dw.SD15_CKPT


def _demo_lora(value: str, sdxl: bool) -> str:
    import demo_weights as dw

    return dw.LORA


DEMO_SUBSTITUTES = {
    ("DistilledUNetLoader", "unet_name"): _demo_unet,
    ("CheckpointLoaderSimple", "ckpt_name"): _demo_ckpt,
    ("DistilledLoraLoader", "lora_name"): _demo_lora,
    ("LoraLoader", "lora_name"): _demo_lora,
    ("LoraLoaderModelOnly", "lora_name"): _demo_lora,
}


#: nodes that read a folder of images (and captions) from ComfyUI's input folder: (node type, input)
INPUT_FOLDER_NODES = (("LoadImageTextDataSetFromFolder", "folder"), ("LoadImageDataSetFromFolder", "folder"))


def demo_input_folders(server: ComfyServer, prompt: dict) -> list[Path]:
    """For every image-folder node whose folder the server's own input folder lacks, a small demo folder there
    (``demo_weights.write_image_text_folder``: noise images with captions); returns the folders written."""
    made = []
    input_dir = (server.workdir / "input").resolve()
    for node in prompt.values():
        for ctype, inp in INPUT_FOLDER_NODES:
            name = node["inputs"].get(inp) if node["class_type"] == ctype else None
            folder = (input_dir / name).resolve() if isinstance(name, str) and name else None
            if folder is None or folder.exists() or input_dir not in folder.parents:
                continue
            import demo_weights

            demo_weights.write_image_text_folder(folder)
            log.info("node %s: input folder %r is not there, using demo images (noise) written in %s", ctype, name,
                     folder)
            made.append(folder)
    return made


class WorkflowError(RuntimeError):
    """The workflow could not be run; the message says why and what to do."""


def combo_options(info: dict, name: str) -> list | None:
    for section in ("required", "optional"):
        spec = (info.get("input", {}).get(section) or {}).get(name)
        if spec is None:
            continue
        if isinstance(spec[0], list):
            return spec[0]
        if spec[0] == "COMBO" and len(spec) > 1:
            return spec[1].get("options", [])
    return None


def missing_models(prompt: dict, object_info: dict) -> list[tuple[str, str, str]]:
    """``[(node id, input, value)]`` for model-file inputs whose value the server does not list."""
    out = []
    for nid, node in prompt.items():
        for (ctype, inp), _ in DEMO_SUBSTITUTES.items():
            if node["class_type"] != ctype or inp not in node["inputs"]:
                continue
            value = node["inputs"][inp]
            opts = combo_options(object_info.get(ctype, {}), inp)
            if opts is not None and value not in opts:
                out.append((nid, inp, value))
    return out


def is_sdxl(prompt: dict) -> bool:
    return any(SDXL_HINT.search(str(node["inputs"][inp]))
               for node in prompt.values() for (ctype, inp) in DEMO_SUBSTITUTES
               if node["class_type"] == ctype and isinstance(node["inputs"].get(inp), str))


def needs_teacher(prompt: dict) -> bool:
    """Whether the workflow builds or distils a student (its checkpoint must then be a full-structure teacher)."""
    return any(node["class_type"] in TEACHER_NODES for node in prompt.values())


def substitute_demo(prompt: dict, sdxl: bool) -> list[tuple[str, str, str, str]]:
    """Swap every model file in ``prompt`` for its demo counterpart (in place); returns the swaps."""
    swaps = []
    teacher = needs_teacher(prompt)
    for nid, node in prompt.items():
        for (ctype, inp), pick in DEMO_SUBSTITUTES.items():
            if node["class_type"] == ctype and inp in node["inputs"]:
                old = node["inputs"][inp]
                node["inputs"][inp] = pick(old, sdxl, teacher) if pick is _demo_ckpt else pick(old, sdxl)
                swaps.append((nid, inp, old, node["inputs"][inp]))
    return swaps


#: nodes other than the Empty*Latent* ones that take the image size as width/height inputs
SIZED_NODES = ("EvaluateStudent",)


def _sized(node: dict) -> bool:
    return node["class_type"].startswith("Empty") or node["class_type"] in SIZED_NODES


def shrink(prompt: dict, steps: int | None = None, size: tuple[int, int] | None = None) -> None:
    """Fewer sampling steps and/or a smaller latent (for quick checks); switch steps scale along."""
    for node in prompt.values():
        inputs = node["inputs"]
        if steps is not None and isinstance(inputs.get("steps"), int):
            old = inputs["steps"]
            inputs["steps"] = steps
            for k in ("switch_step", "end_at_step", "start_at_step"):
                if isinstance(inputs.get(k), int) and old:
                    inputs[k] = min(steps, max(0, round(inputs[k] * steps / old)))
            if isinstance(inputs.get("switch_step"), int):
                inputs["switch_step"] = min(max(1, inputs["switch_step"]), max(1, steps - 1))
        if size is not None and _sized(node) and "width" in inputs and "height" in inputs:
            inputs["width"], inputs["height"] = size


def expected_sizes(prompt: dict) -> set[tuple[int, int]]:
    """(width, height) of every EmptyLatentImage-like node (and Evaluate Student): what the saved images should
    measure."""
    return {(n["inputs"]["width"], n["inputs"]["height"]) for n in prompt.values()
            if _sized(n) and isinstance(n["inputs"].get("width"), int)}


def prepare(server: ComfyServer, workflow: dict, demo_dir: Path | None, *, steps=None, size=None,
            force_demo: bool = False) -> tuple[dict, list]:
    """API prompt for ``workflow`` on ``server``, with demo weights swapped in when models are missing."""
    object_info = server.object_info()
    prompt = convert(workflow, object_info)
    demo_input_folders(server, prompt)
    missing = missing_models(prompt, object_info)
    swaps = []
    if missing or force_demo:
        if demo_dir is None:
            raise WorkflowError("missing model files: " + ", ".join(f"{v!r} (node {n} {i})" for n, i, v in missing))
        import demo_weights

        sdxl = is_sdxl(prompt)
        demo_weights.ensure(demo_dir, sdxl=sdxl, teacher=needs_teacher(prompt))
        swaps = substitute_demo(prompt, sdxl)
        object_info = server.object_info()
        still = missing_models(prompt, object_info)
        if still:
            raise WorkflowError(f"demo weights written under {demo_dir} but the server does not list "
                                f"{', '.join(v for _, _, v in still)}; is {demo_dir} in the server's model paths?")
    if swaps and steps is None and size is None:
        # noise either way: keep the demo quick on a CPU (512 px x 25 steps takes minutes there)
        steps, size = DEMO_STEPS, DEMO_SIZE
        log.info("demo weights: running %d steps at %dx%d (pass --steps/--size to change)", steps, *size)
    shrink(prompt, steps, size)
    return prompt, swaps


def run_one(server: ComfyServer, path: Path, out_dir: Path, demo_dir: Path | None, *, steps=None, size=None,
            force_demo=False, timeout=1800) -> dict:
    """Run one workflow file; returns a summary dict (images, swaps, seconds)."""
    workflow = json.loads(path.read_text(encoding="utf-8"))
    prompt, swaps = prepare(server, workflow, demo_dir, steps=steps, size=size, force_demo=force_demo)
    for nid, inp, old, new in swaps:
        log.info("node %s %s: %r is not installed, using demo weights %r", nid, inp, old, new)
    t = time.perf_counter()
    entry = server.run(prompt, {"extra_pnginfo": {"workflow": workflow}}, timeout=timeout)
    err = execution_error(entry)
    if err:
        raise WorkflowError(f"{path.name} failed in ComfyUI: {err}")
    images = server.output_images(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = [copy_numbered(img, out_dir, f"{path.stem}_{saver_prefix(img.name)}") for img in images]
    return {"workflow": path, "images": copied, "swaps": swaps, "seconds": time.perf_counter() - t,
            "prompt": prompt}


COUNTER = re.compile(r"_(\d{5,})_$")


def saver_prefix(name: str) -> str:
    """``distilled_unet_00001_.png`` -> ``distilled_unet``: the prefix a ComfyUI saver numbered."""
    stem = Path(name).stem
    return COUNTER.sub("", stem) or stem


def copy_numbered(src: Path, out_dir: Path, prefix: str) -> Path:
    """Copy ``src`` to ``out_dir/<prefix>_<counter>_<suffix>``, numbered the way ComfyUI's savers number
    their files: one past the highest counter already there for that prefix, so a second run never
    replaces the images of the first. The file is created exclusively (a concurrent run takes the next one)."""
    suffix = src.suffix
    pattern = re.compile(re.escape(prefix) + r"_(\d+)_" + re.escape(suffix) + "$")
    counter = max((int(m.group(1)) for f in out_dir.iterdir() if (m := pattern.match(f.name))), default=0)
    data = src.read_bytes()
    while True:
        counter += 1
        dest = out_dir / f"{prefix}_{counter:05}_{suffix}"
        try:
            with open(dest, "xb") as f:
                f.write(data)
            return dest
        except FileExistsError:
            continue


def files_under(*roots: Path) -> dict[Path, tuple[int, int]]:
    """``{file: (size, mtime_ns)}`` of every file under ``roots`` (missing roots are empty)."""
    out = {}
    for root in roots:
        for base, _, files in os.walk(root):
            for f in files:
                st = os.stat(os.path.join(base, f))
                out[Path(base) / f] = (st.st_size, st.st_mtime_ns)
    return out


def saved_files(before: dict, after: dict, skip=(".png",)) -> list[Path]:
    """Files new or rewritten between two :func:`files_under` listings (images left out: they are reported
    as the copies made of them)."""
    return sorted(f for f, st in after.items() if before.get(f) != st and f.suffix.lower() not in skip)


def server_model_dirs(models: Path | None, demo_dir: Path | None) -> list[Path]:
    dirs = []
    if models is not None:
        dirs.append(models)
    if demo_dir is not None:
        for f in MODEL_FOLDERS:
            (demo_dir / f).mkdir(parents=True, exist_ok=True)
        dirs.append(demo_dir)
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a shipped example workflow headless through ComfyUI's own "
                                             "executor and write its PNGs.")
    ap.add_argument("workflow", nargs="?", help="a UI-format workflow .json (e.g. workflows/distilled_unet_sd15.json)")
    ap.add_argument("--all", action="store_true", help="run every workflow in workflows/")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, the enclosing ComfyUI, or ~/ComfyUI)")
    ap.add_argument("--models", type=Path, help="your models folder, laid out like ComfyUI/models "
                                                "(ComfyUI's own models/ is always searched)")
    ap.add_argument("--out", type=Path, default=Path("distilled_unets_output"),
                    help="where the PNGs are copied and everything the server writes goes: models/ (saved students), "
                         "output/ (ComfyUI's output: images as saved, distiller checkpoints)")
    ap.add_argument("--demo-dir", type=Path, default=DEFAULT_DEMO_DIR,
                    help=f"where demo weights are generated when models are missing (default {DEFAULT_DEMO_DIR})")
    ap.add_argument("--demo", action="store_true", help="use demo weights even when your models are there")
    ap.add_argument("--steps", type=int, help="override the sampling steps (quicker checks)")
    ap.add_argument("--size", help="override the image size, WxH (e.g. 256x256)")
    ap.add_argument("--python", help="Python that runs ComfyUI (default: this one)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.demo_dir = args.demo_dir.expanduser().resolve()
    args.models = args.models.expanduser().resolve() if args.models else None
    args.out = args.out.expanduser().resolve()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    if args.all == bool(args.workflow):
        ap.error("give one workflow file or --all")
    files = sorted((REPO / "workflows").glob("*.json")) if args.all else [Path(args.workflow)]
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    comfyui = find_comfyui(args.comfyui)
    if comfyui is None:
        sys.stderr.write(f"error: {missing_reason(args.comfyui)}; pass --comfyui PATH or set COMFYUI_PATH\n")
        return 2
    results, failures = [], []
    models_out, output = args.out / "models", args.out / "output"
    args.out.mkdir(parents=True, exist_ok=True)
    before = files_under(models_out, output)
    work = Path(tempfile.mkdtemp(prefix=".comfyui-", dir=args.out))  # user, input, temp, log: removed at the end
    try:
        with ComfyServer(comfyui, server_model_dirs(args.models, args.demo_dir), python=args.python, workdir=work,
                         models_out=models_out, output_dir=output) as server:
            for i, f in enumerate(files):
                try:
                    if i:
                        server.free()  # the last workflow's models out of memory first
                    results.append(run_one(server, f, args.out, args.demo_dir, steps=args.steps, size=size,
                                           force_demo=args.demo))
                except (WorkflowError, ConversionError, PromptRejected, ServerError) as e:
                    failures.append((f, str(e)))
                    log.error("%s: %s", f.name, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    saved = saved_files(before, files_under(models_out, output))
    for r in results:
        for img in r["images"]:
            print(f"wrote {img}  ({r['workflow'].name}, {r['seconds']:.1f} s)")  # noqa: T201
        if r["swaps"]:
            print("  these images are NOISE: made with random demo weights, because the workflow's models "  # noqa: T201
                  "are not installed (" + ", ".join(sorted({o for _, _, o, _ in r["swaps"]})) + ")")
    for path in saved:
        print(f"saved {path}  ({path.stat().st_size / 2**20:.0f} MB)")  # noqa: T201
    if saved and any(r["swaps"] for r in results):
        print("  saved from random demo weights: delete them when done (nothing was written into "  # noqa: T201
              f"{comfyui})")
    for f, e in failures:
        print(f"FAILED {f}: {e}")  # noqa: T201
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
