"""`train.amp: auto` and `train.channels_last: auto`: bf16 (and NHWC) where the CPU computes bf16 natively, after a
first-batch check against fp32; the choice is logged, stored in the checkpoints and kept by `--resume`."""

import logging

import pytest
import torch
from torch import nn

from finetune import train
from finetune.inference import device as devices
from finetune.inference.device import autocast_dtype, native_bf16
from finetune.training import precision as precision_module
from finetune.training.distributed import Ranks
from finetune.training.precision import choose_precision, passes

from conftest import tiny_recipe

CPU = torch.device("cpu")
AUTO = tiny_recipe(train={"epochs": 2, "lr": 0.01, "amp": "auto", "channels_last": "auto"})


def _cpu(monkeypatch, flag, *, min_side=0):
    """This machine as a CPU with (`flag`) or without native bf16; tiny test images count as large enough."""
    monkeypatch.setattr(devices, "native_bf16", lambda *args: flag)
    monkeypatch.setattr(precision_module, "CPU_BF16_MIN_SIDE", min_side)


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 sha_ni\n")
    assert native_bf16(info) == "avx512_bf16"
    info.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile avx512_bf16\n")
    assert native_bf16(info) == "amx_bf16"
    info.write_text("flags\t\t: fpu avx2 avx512f\n")  # emulated bf16 (AVX2, plain AVX-512): ~15x slower than fp32
    assert native_bf16(info) is None
    assert native_bf16(tmp_path / "absent") is None  # no /proc (macOS, Windows): fp32


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    _cpu(monkeypatch, "avx512_bf16")
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    _cpu(monkeypatch, None)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16 and autocast_dtype("off", CPU) is None
    _cpu(monkeypatch, "avx512_bf16")
    assert autocast_dtype("auto", CPU, side=32) is None and autocast_dtype("auto", CPU, side=224) == torch.bfloat16


class _Scrambled(nn.Module):
    """A model whose low-precision forward says something else than its fp32 one (a broken kernel)."""

    def forward(self, images):
        logits = torch.stack([images.mean((1, 2, 3)) * 10, -images.mean((1, 2, 3)) * 10], dim=1)
        return -logits if torch.is_autocast_enabled("cpu") else logits


def test_a_low_precision_forward_that_disagrees_falls_back_to_fp32(monkeypatch, caplog):
    _cpu(monkeypatch, "avx512_bf16")
    images, targets = torch.rand(8, 3, 4, 4) - 0.5, torch.tensor([0, 1] * 4)
    with caplog.at_level(logging.INFO, logger="finetune.training.precision"):
        chosen = choose_precision(
            "auto", device=CPU, model=_Scrambled(), batch=(images, targets), criterion=nn.CrossEntropyLoss(), ranks=Ranks()
        )
    assert chosen.amp == "off" and chosen.dtype is None
    assert "amp auto: fp32 (CPU has avx512_bf16, but bf16 failed the check: first batch loss" in caplog.text
    assert "needs loss within 0.05 relative and 90% agreement" in caplog.text
    assert not passes({"loss_fp32": 0.69, "loss_low": float("nan"), "agreement": 1.0, "clear": 8})
    assert passes({"loss_fp32": 0.6931, "loss_low": 0.6929, "agreement": 1.0, "clear": 8})
    assert not passes({"loss_fp32": 0.6931, "loss_low": 0.6929, "agreement": 0.5, "clear": 8})


def test_small_images_stay_in_fp32_on_a_cpu(monkeypatch, caplog):
    _cpu(monkeypatch, "avx512_bf16", min_side=224)  # bf16 was measured faster at 224 px, slower at 32
    batch = (torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    with caplog.at_level(logging.INFO, logger="finetune.training.precision"):
        chosen = choose_precision(
            "auto", device=CPU, model=_Scrambled(), batch=batch, criterion=nn.CrossEntropyLoss(), ranks=Ranks()
        )
    assert chosen.amp == "off" and "amp auto: fp32 (32 px images: on a CPU bf16 is faster from 224 px on)" in caplog.text


def test_auto_trains_in_bf16_records_it_and_resume_keeps_it(tmp_path, image_folder, monkeypatch, caplog):
    _cpu(monkeypatch, "avx512_bf16")
    with caplog.at_level(logging.INFO, logger="finetune.training"):
        full = train(recipe=AUTO, data=image_folder, out=tmp_path / "full", progress=False)
    assert "amp auto: bf16 (CPU has avx512_bf16; first batch loss" in caplog.text
    assert "channels_last auto: on" in caplog.text
    for name in ("best.pt", "last.pt"):
        stored = torch.load(full.run_dir / "checkpoints" / name, weights_only=True)["precision"]
        assert stored["amp"] == "bf16" and stored["channels_last"] is True and "fp32" in stored["reason"]
    page = (full.run_dir / "report" / "report.html").read_text()
    assert "bf16 autocast, channels_last (CPU has avx512_bf16; first batch loss" in page

    class _Stop(Exception):
        pass

    def stop(state):
        if state.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(recipe=AUTO, data=image_folder, out=tmp_path / "cut", progress=False, on_epoch_end=stop)
    _cpu(monkeypatch, None)  # resumed on a machine without native bf16: the run still finishes as it started
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune.training"):
        resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    assert "amp: bf16, channels_last, as the run chose when it started" in caplog.text
    assert "amp auto:" not in caplog.text  # not decided again
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_is_fp32_without_native_bf16(tmp_path, image_folder, monkeypatch, caplog):
    _cpu(monkeypatch, None)
    with caplog.at_level(logging.INFO, logger="finetune.training.precision"):
        result = train(
            recipe={**AUTO, "train": {**AUTO["train"], "epochs": 1}}, data=image_folder, out=tmp_path / "r", progress=False
        )
    assert "amp auto: fp32 (no native bf16)" in caplog.text
    stored = torch.load(result.best_checkpoint, weights_only=True)["precision"]
    assert stored == {"amp": "off", "reason": "no native bf16", "channels_last": False}
