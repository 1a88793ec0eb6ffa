"""Generate LoRA files in every format we read, with the exact delta each module should receive.

Host-free: callers give module paths (diffusers or ldm, as the format names them) with the weight
shape they patch; we return the file's tensors, its metadata, an optional PEFT adapter config and
``deltas``: {path: delta at strength 1}, the manual merge ``(alpha/rank) * up @ down`` (LoHa:
``(alpha/r) * (w1a@w1b) * (w2a@w2b)``; LoKr: ``(alpha/r) * kron(w1, w2a@w2b)``).
"""

from __future__ import annotations

import json
import math
import re

import torch

FORMATS = ("kohya", "kohya-ldm", "diffusers-old", "diffusers-new", "peft", "peft-unet", "ldm", "loha", "lokr")
#: formats whose module paths are ldm paths; the rest take diffusers paths
LDM_FORMATS = ("kohya-ldm", "ldm")
ATTN_PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0")


def applies(fmt: str, path: str, shape) -> bool:
    """Whether this format can name this module (old diffusers: attention projections only;
    LoKr here: even dimensions)."""
    if fmt == "diffusers-old":
        return path.endswith(ATTN_PROJ)
    if fmt == "lokr":
        return shape[0] % 2 == 0 and math.prod(shape[1:]) % 2 == 0
    return len(shape) >= 2


def lora_for(modules: dict, fmt: str, *, rank: int = 2, alpha: float = 3.0, seed: int = 0, scale: float = 0.1):
    """(tensors, metadata, adapter_config, deltas) of a LoRA on ``modules`` ({path: weight shape})."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    adapter_config = None

    def rnd(*shape):
        return scale * torch.randn(*shape, generator=g)

    for path, shape in modules.items():
        shape = tuple(shape)
        if not applies(fmt, path, shape):
            continue
        out, inn = shape[0], math.prod(shape[1:])
        under = path.replace(".", "_")
        if fmt in ("loha", "lokr"):
            base = f"lora_unet_{under}"
            if fmt == "loha":
                w1a, w1b, w2a, w2b = rnd(out, rank), rnd(rank, inn), rnd(out, rank), rnd(rank, inn)
                t.update({f"{base}.hada_w1_a": w1a, f"{base}.hada_w1_b": w1b, f"{base}.hada_w2_a": w2a,
                          f"{base}.hada_w2_b": w2b})
                d = (w1a @ w1b) * (w2a @ w2b)
            else:
                w1, w2a, w2b = rnd(2, 2), rnd(out // 2, rank), rnd(rank, inn // 2)
                t.update({f"{base}.lokr_w1": w1, f"{base}.lokr_w2_a": w2a, f"{base}.lokr_w2_b": w2b})
                d = torch.kron(w1, w2a @ w2b)
            t[f"{base}.alpha"] = torch.tensor(alpha)
            deltas[path] = (alpha / rank) * d.reshape(shape)
            continue
        down = rnd(rank, *shape[1:])
        up = rnd(out, rank, *([1] * (len(shape) - 2)))
        s = alpha / rank
        if fmt in ("kohya", "kohya-ldm"):
            base = f"lora_unet_{under}"
            t.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                      f"{base}.alpha": torch.tensor(alpha)})
        elif fmt == "ldm":
            base = f"diffusion_model.{path}"
            t.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                      f"{base}.alpha": torch.tensor(alpha)})
        elif fmt == "diffusers-old":
            p = path[:-2] if path.endswith(".to_out.0") else path
            head, _, proj = p.rpartition(".")
            base = f"unet.{head}.processor.{proj}"
            t.update({f"{base}_lora.down.weight": down, f"{base}_lora.up.weight": up})
            s = 1.0
        elif fmt == "diffusers-new":
            base = f"unet.{path}"
            t.update({f"{base}.lora.down.weight": down, f"{base}.lora.up.weight": up})
            s = 1.0
        elif fmt == "peft":
            base = f"base_model.model.{path}"
            t.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up})
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
                {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": ["to_q"]})}
        elif fmt == "peft-unet":
            base = f"unet.{path}"
            t.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up})
            adapter_config = {"r": rank, "lora_alpha": alpha, "target_modules": ["to_q"]}
        else:
            raise ValueError(fmt)
        deltas[path] = s * (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return t, metadata, adapter_config, deltas


def expected_bk(teacher_path: str, student) -> str | None:
    """The published BK-SDM/segmind correspondence, written out independently of the implementation.

    ``student``: a Topology (BK-Base, -Small or -Tiny structure)."""
    levels = len(student.channel_mult)
    m = re.match(r"(down_blocks|up_blocks)\.(\d)\.(resnets|attentions|downsamplers|upsamplers)\.(\d)(.*)", teacher_path)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if b >= levels or (kind == "downsamplers" and b == levels - 1):
                return None
            if kind in ("resnets", "attentions") and j != 0:
                return None
            return teacher_path
        b2 = b - (4 - levels)  # tiny: student up j <- teacher up j+1
        if b2 < 0:
            return None
        if kind in ("resnets", "attentions"):
            j2 = {0: 0, 2: 1}.get(j)
            if j2 is None:
                return None
            return f"up_blocks.{b2}.{kind}.{j2}{rest}"
        return f"up_blocks.{b2}.{kind}.{j}{rest}"
    if teacher_path.startswith("mid_block"):
        return teacher_path if student.transformer_depth_middle >= 0 else None
    return teacher_path
