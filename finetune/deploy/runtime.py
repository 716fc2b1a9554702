"""An exported file as a predictor: its metadata (the contract) and a runner, for `finetune predict MODEL.onnx` (or a
.pt2 / TorchScript file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.transforms import ImageConfig
from finetune.deploy import onnx_format, torchscript_format
from finetune.deploy.metadata import FORMAT
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


def load_exported(path: Path) -> Exported:
    """Read the contract and open a runner; a file without finetune's metadata is refused with the reason."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        onnx_format.require_onnx(exporting=False)
        try:
            meta = onnx_format.read_metadata(path)
        except Exception as exc:  # onnx raises its own decode errors
            raise CheckpointError(f"{path} is not a readable ONNX file ({str(exc).splitlines()[0][:120]})") from None
        runner: Runner = onnx_format.OnnxRunner(path)
    else:
        meta = torchscript_format.read_metadata(path)
        program = torchscript_format.is_program(path)
        runner = torchscript_format.ProgramRunner(path) if program else torchscript_format.TorchScriptRunner(path)
    if meta.get("format") != FORMAT or "class_names" not in meta:
        raise CheckpointError(
            f"{path} carries no finetune metadata (class names, input size, resize rule); "
            "export the run with 'finetune export RUN' and predict with that file"
        )
    return Exported(path=path, meta=meta, run=runner)
