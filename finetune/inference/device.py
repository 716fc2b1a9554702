"""Where tensors live and at which precision: the device choice and the autocast dtype."""

from __future__ import annotations

import torch

from finetune.errors import RecipeError


def check_device(name: str) -> None:
    """A recipe that asks for CUDA on a machine without a visible GPU fails here, before any work or file."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is cuda but no GPU is visible; use train.device: auto (or cpu, gloo under torchrun)")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device supports it: bf16 (or fp16) on CUDA; on CPU only when asked (bf16)."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if amp == "bf16" else None
