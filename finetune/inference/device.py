"""Where tensors live and at which precision: the device choice and the autocast dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.errors import RecipeError

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs whose bf16 matmuls are not emulated
CPUINFO = Path("/proc/cpuinfo")
# bf16 autocast on a CPU was measured faster at 224 px and slower, erratic at 32 px (BENCHMARKS.md, "Fast defaults")
CPU_BF16_MIN_SIDE = 224


def check_device(name: str) -> None:
    """A recipe that asks for CUDA on a machine without a visible GPU fails here, before any work or file."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is cuda but no GPU is visible; use train.device: auto (or cpu, gloo under torchrun)")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU feature that computes bf16 natively ('amx_bf16' or 'avx512_bf16'), None where torch would emulate it
    (AVX2-only CPUs, where bf16 autocast is ~15x slower than fp32) or where the CPU's flags cannot be read."""
    try:
        flags = set(cpuinfo.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def autocast_dtype(amp: str, device: torch.device, *, side: int | None = None) -> torch.dtype | None:
    """The autocast dtype a recipe asks for: bf16 (fp16 where a GPU lacks bf16) on CUDA; on CPU bf16 when asked, or
    for `auto` when the CPU computes bf16 natively and the images (`side` px, None: unknown) are not below
    CPU_BF16_MIN_SIDE. Training checks `auto`'s choice on its first batch (training.precision) before it keeps it."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if amp == "auto":
        large = side is None or side >= CPU_BF16_MIN_SIDE
        return torch.bfloat16 if large and native_bf16() else None
    return torch.bfloat16 if amp == "bf16" else None
