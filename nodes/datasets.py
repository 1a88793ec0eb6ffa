"""LoadDistillationDataset: a ComfyUI training dataset (``SaveTrainingDataset``'s shard folder in ComfyUI's
``datasets`` folder) as a ``DISTILL_DATA`` value that ``DistillStudentUNet`` streams shard by shard.

The value names the folder and reads nothing big: ``DistillStudentUNet`` opens it with its own teacher (the
teacher's latent format and conditioning code turn ComfyUI's samples into the UNets' inputs, so the data can never
be prepared for another model than the one it is distilled from), through ``models.students.distill.datasets``
(weights-only shard reads, a sample index, a few shard files open whatever the dataset's size).

The held-out split is part of the value (``heldout_fraction``): which samples are held out is a property of the
dataset (a fixed seed, the dataset's size and the fraction), not of a training run, so every run on the same
dataset, whatever its own seed, settings or number of processes, measures its held-out error on the same samples
and never trains on them. Held-out latents connected to Distill Student UNet replace the split.

ComfyUI 0.33 registers the ``datasets`` folder (``<ComfyUI>/datasets``, more roots through extra_model_paths);
on older ComfyUI (0.3.64) the pack registers the same folder, so the node loads and lists nothing until a
ComfyUI with Save Training Dataset wrote a dataset there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from ..models.students.distill.data import HELDOUT_MAX
from ..models.students.distill.datasets import SHARD, DatasetError, ShardedDataset, shard_files
from .students import CATEGORY

log = logging.getLogger("distilled_unets")

NODE = "LoadDistillationDataset"
DATASETS = "datasets"
DISTILL_DATA = "DISTILL_DATA"
HELDOUT_DEFAULT = 0.01
NEEDS = ("datasets are written into ComfyUI's datasets folder by Save Training Dataset (Make Training Dataset -> "
         "Save Training Dataset, ComfyUI 0.33 or newer)")


def _register_datasets_folder() -> None:
    """``<ComfyUI>/datasets`` as ComfyUI 0.33 registers it; older versions do not: add the entry where missing."""
    if DATASETS not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[DATASETS] = ([os.path.join(folder_paths.base_path, DATASETS)], set())


_register_datasets_folder()


def dataset_roots() -> list[str]:
    return folder_paths.get_folder_paths(DATASETS)


def _inside(root: str, target: str) -> bool:
    """``target`` resolves (symlinks followed) to a folder strictly inside ``root``."""
    try:
        r, t = os.path.realpath(root), os.path.realpath(target)
        return t != r and os.path.commonpath((r, t)) == r
    except ValueError:  # a NUL byte, or another drive
        return False


def _has_shards(folder: str) -> bool:
    try:
        return any(SHARD.match(f) for f in os.listdir(folder))
    except OSError:
        return False


def dataset_choices() -> list[str]:
    """Relative names of the folders under every datasets root that hold ``shard_NNNN.pkl`` files (symlinked
    folders followed once, never outside their root)."""
    found = set()
    for root in dataset_roots():
        if not os.path.isdir(root):
            continue
        seen = set()
        for base, dirs, _files in os.walk(root, followlinks=True):
            try:
                st = os.stat(base)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen or (base != root and not _inside(root, base)):
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.sort()
            if base != root and _has_shards(base):
                found.add(os.path.relpath(base, root).replace(os.sep, "/"))
    return sorted(found)


def name_problem(name) -> str | None:
    """Why ``name`` cannot name a dataset folder under the datasets roots (None when it can)."""
    if not isinstance(name, str) or not name.strip():
        return "no dataset folder named"
    if os.path.isabs(name) or any(part == ".." for part in name.replace("\\", "/").split("/")) or "\0" in name:
        return f"'{name}' is not a folder name inside the datasets folder"
    return None


def resolve_dataset(name: str, *, input_name: str = "folder_name") -> str:
    """The folder of dataset ``name`` under the first datasets root that has it (traversal-safe)."""
    problem = name_problem(name)
    if problem is None:
        for root in dataset_roots():
            target = os.path.join(root, name)
            if _inside(root, target) and os.path.isdir(target):
                return os.path.realpath(target)
        problem = f"no dataset folder '{name}' in {', '.join(dataset_roots())}"
    raise DatasetError(problem, f"pick a dataset from the list (press R to refresh); {NEEDS}; to save and distil in "
                       "one run, connect the latents you save to saved_latents (the save then runs first)", node=NODE,
                       input_name=input_name)


@dataclass(frozen=True)
class DistillDataset:
    """A ``DISTILL_DATA`` value: a Save Training Dataset folder, opened by the node that trains on it."""

    folder: str
    name: str
    cache_shards: int = 2         # shard files open at once
    heldout_fraction: float = 0.0  # held out of training (models.students.distill.split_heldout)

    def open(self, prepare) -> ShardedDataset:
        """The streaming data source, samples prepared by ``prepare(latent, conditioning)`` (see
        ``nodes.host.samples.prepare_sample``)."""
        return ShardedDataset(self.folder, prepare, max_open=self.cache_shards)

    def __str__(self) -> str:
        return f"dataset '{self.name}' ({self.folder})"


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def _declared_samples(folder: str) -> int | None:
    import json

    try:
        with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as f:
            return int(json.load(f)["num_samples"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


def load_dataset(folder_name: str, saved_latents=None, heldout_fraction: float = HELDOUT_DEFAULT) -> DistillDataset:
    """The checks the loader makes before any training: the folder exists under a datasets root and holds
    shards, and when the latents just saved are connected, it holds as many samples as they are."""
    if not isinstance(heldout_fraction, (int, float)) or not 0 <= heldout_fraction < 1:
        raise DatasetError(f"heldout_fraction is {heldout_fraction!r}", "give a fraction in [0, 1) (0 = nothing "
                           "held out)", node=NODE, input_name="heldout_fraction")
    folder = resolve_dataset(folder_name)
    try:
        files = shard_files(folder)
    except DatasetError as e:
        e.node, e.input_name = NODE, "folder_name"
        raise
    if saved_latents:
        declared = _declared_samples(folder)
        if declared is not None and declared != len(saved_latents):
            raise DatasetError(f"the folder holds {declared} samples, the latents connected to saved_latents are "
                               f"{len(saved_latents)}", "give folder_name the folder_name of the Save Training "
                               "Dataset node those latents go to", path=folder, node=NODE, input_name="folder_name")
    log.info("%s: %s (%d shard files, held-out fraction %g)", NODE, folder, len(files), heldout_fraction)
    return DistillDataset(folder, folder_name, heldout_fraction=float(heldout_fraction))


class LoadDistillationDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Load Distillation Dataset",
            category=CATEGORY,
            description=("Streams a training dataset saved by ComfyUI's Save Training Dataset (ComfyUI's datasets "
                         "folder; ComfyUI 0.33 or newer makes them) into Distill Student UNet's `data` input, shard by "
                         "shard: for datasets that do not fit in memory. Shards are read with torch's weights-only "
                         "loader; one that needs more is refused with its file named. Distill Student UNet "
                         "prepares the samples with its teacher."),
            is_input_list=True,  # saved_latents is a list (Make Training Dataset's); the rest arrive as [value]
            inputs=[
                io.Combo.Input("folder_name", options=dataset_choices(),
                               tooltip="A dataset folder in ComfyUI's datasets folder (Save Training Dataset's "
                                       "folder_name). A name saved in the same run is accepted before it exists. "
                                       + NEEDS[0].upper() + NEEDS[1:] + "."),
                io.Latent.Input("saved_latents", optional=True,
                                tooltip="To save and distil in one run: connect the latents you give Save "
                                        "Training Dataset. This node then waits for them, and ComfyUI runs the "
                                        "save (an output node) as soon as they are ready, before this node; the "
                                        "folder must hold as many samples."),
                io.Float.Input("heldout_fraction", default=HELDOUT_DEFAULT, min=0.0, max=0.5, step=0.005,
                               round=0.0001, optional=True,
                               tooltip="This fraction of the samples (at least 1, at most "
                                       f"{HELDOUT_MAX}) is held out of training, chosen by a fixed seed: Distill "
                                       "Student UNet measures its held-out error on them before, during and after "
                                       "the run. The same samples for every run on this dataset. 0 = none "
                                       "(held-out latents connected to Distill Student UNet replace the split)."),
            ],
            outputs=[io.Custom(DISTILL_DATA).Output("data", tooltip="The dataset, for Distill Student UNet's "
                                                                    "`data` input.")],
        )

    @classmethod
    def validate_inputs(cls, folder_name) -> bool | str:
        # a folder written by Save Training Dataset in the same run does not exist yet when the prompt is checked:
        # only the name is checked here, the folder when the node runs
        return name_problem(_first(folder_name)) or True

    @classmethod
    def fingerprint_inputs(cls, folder_name, saved_latents=None, heldout_fraction=None):
        """The shard files' names, sizes and times: a dataset saved again under the same name runs again."""
        name = _first(folder_name)
        h = hashlib.blake2b(digest_size=16)
        h.update(str(name).encode())
        try:
            folder = resolve_dataset(name)
            for f in sorted(os.listdir(folder)):
                if SHARD.match(f) or f == "metadata.json":
                    st = os.stat(os.path.join(folder, f))
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        except (DatasetError, OSError):
            h.update(b"missing")
        return h.hexdigest()

    @classmethod
    def execute(cls, folder_name, saved_latents=None, heldout_fraction=HELDOUT_DEFAULT) -> io.NodeOutput:
        fraction = _first(heldout_fraction)
        return io.NodeOutput(load_dataset(_first(folder_name), saved_latents,
                                          HELDOUT_DEFAULT if fraction is None else fraction))


NODES = [LoadDistillationDataset]
