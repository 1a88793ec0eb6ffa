"""The FID Inception network from a file the user places, and reference statistics in pytorch-fid's format.

The network is the TensorFlow FID Inception (2015-12-05) as pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``)
and torch-fidelity (``weights-inception-2015-12-05-6726825d.pth``) ship it: a plain state dict whose key names
are the same in both (torchvision's Inception3 names, ``fc`` with 1008 classes), or a ``.safetensors`` file of
the same tensors. The file is read weights-only (safetensors, or ``torch.load(weights_only=True)``), never by
unpickling code, and nothing is downloaded.

The architecture is torch-fidelity's ``FeatureExtractorInceptionV3``, built from the tensors already read (it is
handed an in-memory copy of them: its own loader would unpickle a file). Its input is prepared as pytorch-fid
prepares it, so the features, and FID against pytorch-fid's statistics (BK-SDM's protocol), are pytorch-fid's:
8-bit RGB / 255, bilinear resize to 299 x 299 (``align_corners=False``), scaled to [-1, 1]. Features: ``pool3``
(2048, for FID and KID) and the unbiased logits (``pool3 @ fc.weight^T``, for the Inception Score as
torch-fidelity computes it).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvaluationError

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
#: a few tensors every FID Inception file has, with their shapes (checked before anything is built)
SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
             "fc.weight": (NUM_CLASSES, FEATURE_DIM), "fc.bias": (NUM_CLASSES,)}
STATS_EXTENSIONS = (".npz",)


def read_state_dict(path: str, *, input_name: str = "inception") -> dict[str, torch.Tensor]:
    """The tensors of an Inception file: safetensors, or a weights-only ``torch.load`` (pickled code is refused).
    Raises EvaluationError naming the file and the fix when it is not the FID Inception."""
    fix = ("put pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
           "weights-inception-2015-12-05-6726825d.pth (or a .safetensors of it) under models/inception")
    if not os.path.isfile(path):
        raise EvaluationError("the Inception file does not exist", fix, path=path, input_name=input_name)
    try:
        if path.endswith((".safetensors", ".sft")):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvaluationError(f"the Inception file cannot be read weights-only ({type(e).__name__}: "
                              f"{str(e)[:160]})", fix, path=path, input_name=input_name) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvaluationError("the file holds no plain state dict", fix, path=path, input_name=input_name)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    bad = [k for k, shape in SIGNATURE.items() if k not in sd or tuple(sd[k].shape) != shape]
    if bad:
        what = "missing" if bad[0] not in sd else f"of shape {tuple(sd[bad[0]].shape)}"
        raise EvaluationError(f"this is not the FID Inception network ({bad[0]} is {what})", fix, path=path,
                              input_name=input_name)
    return sd


class InceptionFeatures(torch.nn.Module):
    """``uint8 [N, H, W, 3]`` (or ``[N, 3, H, W]``) -> (pool3 ``[N, 2048]``, unbiased logits ``[N, 1008]``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], *, path: str | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:  # pragma: no cover - requirements.txt lists it
            raise EvaluationError("torch-fidelity is not installed (it provides the Inception architecture)",
                                  "pip install torch-fidelity (listed in the pack's requirements.txt)", path=path,
                                  input_name="inception") from e
        sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        for k in [k for k in sd if k.endswith(".bn.running_var")]:  # files saved without BN step counters
            sd.setdefault(k.replace("running_var", "num_batches_tracked"), torch.tensor(0, dtype=torch.long))
        buf = io.BytesIO()
        torch.save(sd, buf)  # torch-fidelity's constructor loads a "path"; hand it these tensors, in memory
        buf.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=buf)
        except RuntimeError as e:
            raise EvaluationError(f"the Inception tensors do not fit the FID Inception ({str(e)[:200]})",
                                  "use the unmodified pytorch-fid or torch-fidelity file", path=path,
                                  input_name="inception") from e
        self.net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        x = images
        if x.shape[-1] in (3, 4) and x.shape[1] not in (3, 4):
            x = x[..., :3].permute(0, 3, 1, 2)
        dev = next(net.parameters()).device
        x = x.to(dev, torch.float32) / 255.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(net, name)(x)
        pool = torch.flatten(x, 1)
        logits = pool @ net.fc.weight.T
        return pool.float().cpu(), logits.float().cpu()


def load_inception(path: str, *, device="cpu") -> InceptionFeatures:
    """The FID Inception of the file at ``path`` (see the module docstring), in eval mode on ``device``."""
    return InceptionFeatures(read_state_dict(path), path=path).to(device)


def features_in_batches(net: InceptionFeatures, images_u8: torch.Tensor, batch: int = 50):
    """(pool3, logits) of many images, ``batch`` at a time."""
    pools, logits = [], []
    for s in range(0, images_u8.shape[0], batch):
        p, lg = net(images_u8[s:s + batch])
        pools.append(p)
        logits.append(lg)
    return torch.cat(pools), torch.cat(logits)


def _npy_header(zf, member: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) an ``.npy`` member of an ``.npz`` archive declares, read from its header alone."""
    with zf.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"{member} is in .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
    return tuple(shape), dtype


def read_reference_stats(path: str, *, dim: int = FEATURE_DIM,
                         input_name: str = "reference_stats") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a pytorch-fid statistics file (``.npz`` with ``mu`` [d] and ``sigma`` [d, d]); a dimension
    other than the network's ``dim`` is refused. The arrays' headers are checked first (numbers, of those shapes),
    so that nothing is allocated from a size the file claims and no pickled object is ever read; then the arrays
    are read with ``allow_pickle=False``."""
    import zipfile

    fix = ("give a pytorch-fid .npz (python -m pytorch_fid --save-stats IMAGES OUT.npz, e.g. BK-SDM's COCO val2014 "
           "256 px statistics) made with the 2048-d pool3 features")

    def bad(problem: str) -> EvaluationError:
        return EvaluationError(problem, fix, path=path, input_name=input_name)

    try:
        with zipfile.ZipFile(path) as zf:
            arrays = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            if "mu" not in arrays or "sigma" not in arrays:
                raise bad(f"the statistics file holds {sorted(arrays)[:8]}, not mu and sigma")
            declared = {k: _npy_header(zf, arrays[k]) for k in ("mu", "sigma")}
    except EvaluationError:
        raise
    except Exception as e:  # not a zip, a damaged archive or .npy header
        raise bad(f"the statistics file cannot be read ({type(e).__name__}: {str(e)[:160]})") from e
    for k, (shape, dtype) in declared.items():
        if dtype.kind not in "fiu":
            raise bad(f"the statistics file cannot be read: {k} holds {dtype} values, not numbers (pickled objects "
                      "are never loaded)")
    (mu_shape, _), (sigma_shape, _) = declared["mu"], declared["sigma"]
    if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]):
        raise bad(f"mu has shape {mu_shape} and sigma {sigma_shape}: not a mean and its covariance")
    if mu_shape[0] != dim:
        raise bad(f"the statistics are {mu_shape[0]}-dimensional, the Inception's pool3 features {dim}-dimensional")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], dtype=np.float64), np.asarray(f["sigma"], dtype=np.float64)
    except Exception as e:
        raise bad(f"the statistics file cannot be read ({type(e).__name__}: {str(e)[:160]})") from e
    if mu.shape != mu_shape or sigma.shape != sigma_shape:  # the archive changed between the two reads
        raise bad(f"mu has shape {mu.shape} and sigma {sigma.shape}: not a mean and its covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise bad("the statistics hold NaN or infinite values")
    return mu, sigma
