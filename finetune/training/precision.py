"""`train.amp: auto` made concrete once per run: bf16 autocast where the hardware computes it natively (on a CPU
for images of 224 px and more, where it was measured faster), after one check on the first training batch that
bf16 says what fp32 says; the choice is logged, stored in every checkpoint
and reused by `--resume` (never decided again, so a resumed run continues in the precision it started with).

The check runs the model in eval mode without gradients (no BatchNorm statistic moves, no random draw is taken
from the training's generators), once in fp32 and once under autocast, and compares:
- the loss, within a relative 5e-2. bf16 keeps 8 significant bits (a rounding error of 2^-8 = 0.4%); through a
  whole ResNet the loss moves by about 1e-5 relative (measured on ResNet-18 and -50), so 5e-2 only trips on a
  broken kernel, an overflow or a NaN, never on rounding;
- the predicted class, on at least 90% of the images whose fp32 decision is clear (top-2 margin above 4 x 2^-8 of
  the largest logit). Near-ties at bf16's resolution may legitimately flip; clear decisions flipping mean bf16
  changes what the model says. The loss alone cannot see that at initialisation, where any near-zero logits give
  a loss of about log(classes).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.inference import device as devices  # devices.native_bf16: the one place tests patch the CPU's features
from finetune.training.distributed import Ranks, mean_across

log = logging.getLogger(__name__)

LOSS_RTOL = 5e-2
AGREEMENT = 0.9
TIE = 4 * 2.0**-8  # top-2 margins below this share of the largest logit are ties at bf16's resolution
CHECK_IMAGES = 32  # the first batch of the training set, capped
# On a CPU bf16 autocast was measured faster at 224 px (ResNet-18 1.3-1.4x, ResNet-50 1.7x; BENCHMARKS.md) and
# slower and erratic at 32 px (single steps up to 7x slower): smaller images stay in fp32.
CPU_BF16_MIN_SIDE = devices.CPU_BF16_MIN_SIDE
DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """The run's autocast choice ('off', 'bf16' or 'fp16') and why; an add-on, so last.pt keeps it for `--resume`."""

    amp: str = "off"
    reason: str = ""
    channels_last: bool = False  # the model and its batches in NHWC layout

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.amp]

    def state_dict(self) -> dict[str, Any]:
        return {"amp": self.amp, "reason": self.reason, "channels_last": self.channels_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.amp, self.reason = str(state["amp"]), str(state.get("reason", ""))
        self.channels_last = bool(state.get("channels_last", False))


def _name(dtype: torch.dtype | None) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _why_candidate(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA device {torch.cuda.get_device_name(device)}"
    return f"CPU has {devices.native_bf16()}"


def compare(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module, dtype: torch.dtype
) -> dict[str, float]:
    """fp32 and `dtype` autocast forwards of one batch: both losses and the agreement of clear decisions."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(images).float()
            with torch.autocast(images.device.type, dtype=dtype):
                low = model(images).float()
            loss_full, loss_low = float(criterion(full, targets)), float(criterion(low, targets))
    finally:
        model.train(was_training)
    top = full.topk(min(2, full.shape[1]), dim=1).values
    clear = (
        (top[:, 0] - top[:, -1]) > TIE * float(full.abs().max()) if full.shape[1] > 1 else torch.ones(len(full), dtype=torch.bool)
    )
    same = (full.argmax(1) == low.argmax(1))[clear]
    return {
        "loss_fp32": loss_full,
        "loss_low": loss_low,
        "agreement": float(same.float().mean()) if len(same) else 1.0,
        "clear": int(clear.sum()),
    }


def passes(check: dict[str, float]) -> bool:
    full, low = check["loss_fp32"], check["loss_low"]
    finite = torch.isfinite(torch.tensor([full, low])).all()
    return bool(finite) and abs(low - full) <= LOSS_RTOL * max(abs(full), 1e-6) and check["agreement"] >= AGREEMENT


def choose_precision(
    amp: str,
    *,
    device: torch.device,
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor] | None,
    criterion: nn.Module,
    ranks: Ranks,
) -> Precision:
    """The run's precision: as the recipe says, or for `auto` the native candidate if it passes the first-batch check.

    Under torchrun every rank decides and the low precision is kept only if all of them chose it (one precision for
    the whole job, even on nodes of different CPUs).
    """
    candidate = devices.autocast_dtype(amp, device)
    if amp != "auto":
        return Precision(amp=_name(candidate), reason=f"train.amp: {amp}")
    side = int(min(batch[0].shape[-2:])) if batch is not None and batch[0].ndim == 4 else None
    small = device.type == "cpu" and side is not None and side < CPU_BF16_MIN_SIDE
    check = None
    if candidate is not None and batch is not None and not small:
        check = compare(model, batch[0].to(device), batch[1].to(device), criterion, candidate)
    ok = check is not None and passes(check)
    everywhere = mean_across([1.0 if ok else 0.0], ranks, device)[0] == 1.0  # every rank takes part, whatever it found
    if candidate is not None and small:
        precision = Precision(amp="off", reason=f"{side} px images: on a CPU bf16 is faster from {CPU_BF16_MIN_SIDE} px on")
    else:
        precision = _decided(candidate, check, device, ok=ok and everywhere, alone=ok)
    if precision.amp == "off" and check is not None:
        log.warning("amp auto: fp32 (%s)", precision.reason)
    else:
        log.info("amp auto: %s (%s)", "fp32" if precision.amp == "off" else precision.amp, precision.reason)
    return precision


def _decided(
    candidate: torch.dtype | None, check: dict[str, float] | None, device: torch.device, *, ok: bool, alone: bool
) -> Precision:
    """The choice and the sentence that explains it."""
    if candidate is None:
        return Precision(amp="off", reason="no native bf16" if device.type == "cpu" else f"no autocast on {device.type}")
    low, why = _name(candidate), _why_candidate(device)
    if check is None:
        return Precision(amp="off", reason=f"{why}, but no training batch to check {low} on")
    measured = (
        f"first batch loss {check['loss_low']:.4f} vs {check['loss_fp32']:.4f} fp32, "
        f"{check['agreement']:.0%} of {int(check['clear'])} clear predictions agree"
    )
    if ok:
        return Precision(amp=low, reason=f"{why}; {measured}")
    if alone:
        return Precision(amp="off", reason=f"{why}; {measured}, but another process's {low} check failed")
    limits = f"needs loss within {LOSS_RTOL:g} relative and {AGREEMENT:.0%} agreement"
    return Precision(amp="off", reason=f"{why}, but {low} failed the check: {measured}; {limits}")


def choose_layout(setting: bool | str, precision: Precision, device: torch.device) -> bool:
    """`channels_last: auto`: NHWC where it was measured faster, bf16 autocast on a CPU with native bf16
    (benchmarks/bench_amp.py; BENCHMARKS.md has the figures); the recipe's true/false otherwise."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cpu" and precision.amp == "bf16" and devices.native_bf16() is not None


def first_batch(dataset: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first images of the training set in its stored order (no sampler, no loader seed touched); of a stream
    (shards), the first it yields read in order."""
    count = min(len(dataset), batch_size, CHECK_IMAGES)
    if count == 0:
        return None
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.default_collate(list(itertools.islice(iter(dataset), count)))
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])
