"""An exported file as a predictor: its metadata (the contract) and a runner, for `finetune predict MODEL.onnx` (or a
.pt2 / TorchScript file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.transforms import ImageConfig
from finetune.deploy import onnx_format, torchscript_format
from finetune.deploy.metadata import check_contract
from finetune.deploy.parity import Runner
from finetune.errors import CheckpointError


@dataclass
class Exported:
    path: Path
    meta: dict[str, Any]
    run: Runner

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in self.meta["class_names"]]

    @property
    def image(self) -> ImageConfig:
        resize = self.meta["resize"]
        return ImageConfig(
            input_size=int(resize["crop"]),
            mean=tuple(self.meta["mean"]),
            std=tuple(self.meta["std"]),
            interpolation=str(resize["interpolation"]),
            crop_pct=float(resize["crop_pct"]),
        )


def is_exported(path: Path) -> bool:
    """An .onnx file, or an ExportedProgram (.pt2) or TorchScript archive written by finetune export."""
    path = Path(path)
    return path.is_file() and (
        path.suffix.lower() == ".onnx" or torchscript_format.is_program(path) or torchscript_format.is_torchscript(path)
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _open(path: Path) -> tuple[dict[str, Any], Runner]:
    """The file's stored metadata and a runner over its graph; a file neither reader can open is one line."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an export that never finished; export the run again")
    onnx = path.suffix.lower() == ".onnx"
    if onnx:
        onnx_format.require_onnx(exporting=False)
    try:  # onnx, protobuf, zipfile, json and torch each raise their own decode errors
        meta = onnx_format.read_metadata(path) if onnx else torchscript_format.read_metadata(path)
    except Exception as exc:
        kind = "ONNX" if onnx else "exported"
        raise CheckpointError(f"{path} is not a readable {kind} file ({_first_line(exc)}); export the run again") from None
    check_contract(meta, path)
    try:
        if onnx:
            runner: Runner = onnx_format.OnnxRunner(path)
        elif torchscript_format.is_program(path):
            runner = torchscript_format.ProgramRunner(path)
        else:
            runner = torchscript_format.TorchScriptRunner(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: its graph cannot be loaded ({_first_line(exc)}); export the run again") from None
    return meta, runner


def _check_graph(path: Path, meta: dict[str, Any], runner: Runner) -> None:
    """One blank image through the graph: it must take the metadata's input size and give one logit and one
    probability per listed class."""
    side, classes = int(meta["input"]["height"]), len(meta["class_names"])
    try:
        logits, probs = runner(np.zeros((1, side, side, 3), dtype=np.uint8))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: its graph does not take the {side} x {side} uint8 image its metadata describes "
            f"({_first_line(exc)}); the metadata belongs to another model: export the run again"
        ) from None
    shapes = {tuple(np.shape(logits)), tuple(np.shape(probs))}
    if shapes != {(1, classes)}:
        widths = sorted({s[-1] if s else 0 for s in shapes})
        raise CheckpointError(
            f"{path}: its metadata lists {classes} classes but the graph gives {', '.join(map(str, widths))} outputs per "
            "image; the metadata belongs to another model: export the run again"
        )


def load_exported(path: Path) -> Exported:
    """Read the contract, check it (its checksum, every field's type and range, and the graph against it: input size,
    output width) and open a runner; anything else is refused with the reason, in one line."""
    path = Path(path)
    meta, runner = _open(path)
    _check_graph(path, meta, runner)
    return Exported(path=path, meta=meta, run=runner)
