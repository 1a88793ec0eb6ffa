"""The VGG term of A-SDM's semantic-aware supervision, host-free.

A-SDM passes "the output of the teacher and the output of the student" through one frozen VGG and aligns
"the various levels of features"; it names neither the VGG variant, nor the layers, nor what the VGG sees.
This module fixes those choices (README, "Distillation"):

* **Network**: the convolutional part of torchvision's VGG16 up to ``relu3_3`` (``features.0`` ...
  ``features.15``): the three levels of the classic perceptual loss (``relu1_2``, ``relu2_2``,
  ``relu3_3``). Weights come from the user's file with torchvision key names (``features.N.weight`` /
  ``.bias``, any prefix such as ``vgg.`` or ``model.``); only the seven convolutions used are read, extra
  keys (deeper layers, the classifier) are ignored. Nothing is downloaded or shipped.
* **Input**: the *predicted clean latents* ``x0`` of student and teacher (from each model's output through
  the model's own parameterisation), mapped to RGB with the latent family's linear latent->RGB preview
  factors (ComfyUI's ``latent_format.latent_rgb_factors``, the same map its fast previews use), taken
  from ``[-1, 1]`` to ``[0, 1]`` and ImageNet-normalised, at latent resolution. Why: the UNet's raw
  output (epsilon or v) is noise-like and has no semantics for an image network, while ``x0`` is the
  image both models currently believe in; the linear preview map is fixed, differentiable and costs
  nothing, where decoding with the VAE would add the VAE's activations to the training memory.
  No clamping, so gradients flow everywhere.
* **Distance**: per level, the mean squared feature difference divided by the mean square of the
  teacher's feature (a relative error, like the epsilon-space terms whose targets have unit variance),
  averaged over the three levels.
* **Per-sample weight**: ``alpha_bar_t`` of the sample's timestep. An ``x0`` error is the epsilon error
  times ``sigma_t``, which reaches ~15 at the last training timestep of SD; weighting by
  ``alpha_bar_t = 1 / (1 + sigma_t^2)`` keeps the term bounded where ``x0`` predictions are mostly noise
  and leaves it at full weight where they are images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import WeightFileError

__all__ = ["VGG16_CONVS", "VGGFeatures", "load_vgg16", "latent_to_vgg_input", "SemanticVGGLoss"]

#: (torchvision features index, in channels, out channels); a 2x2 max-pool follows indices 2 and 7.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256))
_POOL_AFTER = (2, 7)
_TAPS = (2, 7, 14)  # relu1_2, relu2_2, relu3_3 follow these convolutions
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(torch.nn.Module):
    """torchvision VGG16 ``features[:16]``; ``forward`` returns [relu1_2, relu2_2, relu3_3]."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleDict({str(i): torch.nn.Conv2d(cin, cout, 3, padding=1)
                                          for i, cin, cout in VGG16_CONVS})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, _, _ in VGG16_CONVS:
            x = F.relu(self.convs[str(i)](x))
            if i in _TAPS:
                feats.append(x)
            if i in _POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return feats


def _find_prefix(keys) -> str | None:
    for k in keys:
        if k.endswith("features.0.weight"):
            return k[: -len("0.weight")]
    return None


def load_vgg16(tensors: dict[str, torch.Tensor], *, path: str | None = None) -> VGGFeatures:
    """A frozen :class:`VGGFeatures` from torchvision-named VGG16 weights (checks names and shapes)."""
    fix = ("use torchvision's VGG16 weights (keys features.0.weight ... features.14.bias; e.g. the file "
           "torchvision saves as vgg16-397923af.pth, converted to .safetensors) and put it in models/vgg")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise WeightFileError("the file does not hold a table of named tensors", fix, path=path)
    prefix = _find_prefix(tensors)
    if prefix is None:
        raise WeightFileError("the file has no 'features.0.weight': it is not a torchvision VGG16", fix, path=path)
    model = VGGFeatures()
    sd = {}
    for i, cin, cout in VGG16_CONVS:
        for part, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
            key = f"{prefix}{i}.{part}"
            t = tensors.get(key)
            if not isinstance(t, torch.Tensor):
                raise WeightFileError(f"the VGG16 file lacks '{key}'" if t is None else f"'{key}' is not a tensor",
                                      fix, path=path)
            if tuple(t.shape) != shape:
                raise WeightFileError(f"'{key}' has shape {tuple(t.shape)}, VGG16 has {shape} (is this VGG19 "
                                      "or a VGG with batch norm?)", fix, path=path)
            sd[f"convs.{i}.{part}"] = t.detach().float().clone()
    model.load_state_dict(sd)
    model.requires_grad_(False)
    model.eval()
    return model


def latent_to_vgg_input(x0: torch.Tensor, rgb_factors: torch.Tensor,
                        rgb_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Latents ``[B, C, H, W]`` (model space) -> ImageNet-normalised RGB ``[B, 3, H, W]`` (no clamp)."""
    rgb = torch.einsum("bchw,cr->brhw", x0, rgb_factors.to(x0))
    if rgb_bias is not None:
        rgb = rgb + rgb_bias.to(x0).view(1, 3, 1, 1)
    rgb = (rgb + 1.0) * 0.5
    mean = torch.tensor(IMAGENET_MEAN, device=x0.device, dtype=x0.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x0.device, dtype=x0.dtype).view(1, 3, 1, 1)
    return (rgb - mean) / std


class SemanticVGGLoss(torch.nn.Module):
    """The VGG term: relative feature error of student vs teacher ``x0`` previews, alpha_bar-weighted."""

    def __init__(self, vgg: VGGFeatures, rgb_factors, rgb_bias=None):
        super().__init__()
        self.vgg = vgg
        self.register_buffer("rgb_factors", torch.as_tensor(rgb_factors, dtype=torch.float32), persistent=False)
        bias = None if rgb_bias is None else torch.as_tensor(rgb_bias, dtype=torch.float32)
        self.register_buffer("rgb_bias", bias, persistent=False)
        if self.rgb_factors.ndim != 2 or self.rgb_factors.shape[1] != 3:
            raise ValueError(f"latent->RGB factors must be [channels, 3], got {tuple(self.rgb_factors.shape)}")

    def teacher_features(self, x0_teacher: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [f.detach() for f in self.vgg(latent_to_vgg_input(x0_teacher, self.rgb_factors, self.rgb_bias))]

    def forward(self, x0_student: torch.Tensor, teacher_feats: list[torch.Tensor],
                sample_weight: torch.Tensor) -> torch.Tensor:
        fs = self.vgg(latent_to_vgg_input(x0_student, self.rgb_factors, self.rgb_bias))
        per_sample = 0.0
        for a, b in zip(fs, teacher_feats):
            a, b = a.float(), b.float()
            err = (a - b).pow(2).flatten(1).mean(1)
            scale = b.pow(2).flatten(1).mean(1).clamp_min(1e-6)
            per_sample = per_sample + err / scale
        per_sample = per_sample / len(fs)
        return (per_sample * sample_weight.float()).mean()
