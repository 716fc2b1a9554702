"""TorchScript: the same contract as the ONNX file (uint8 NHWC in, logits and probs out) through torch.jit.trace, with
the metadata as the extra file finetune.json. (torch.jit is deprecated upstream; it still loads without finetune.)"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.deploy.metadata import TORCHSCRIPT_EXTRA
from finetune.deploy.package import PackagedClassifier


def export_torchscript(package: PackagedClassifier, path: Path, *, size: int, meta: dict[str, Any]) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(package.eval(), (example,))
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive written by finetune export (not a finetune checkpoint, which torch.load reads)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"extra/{TORCHSCRIPT_EXTRA}") for name in archive.namelist())


def read_metadata(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(f"extra/{TORCHSCRIPT_EXTRA}"))
        return dict(json.loads(archive.read(name)))


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Save the archive again with new metadata (the graph is unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        torch.jit.save(module, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


class TorchScriptRunner:
    def __init__(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)))
        return logits.numpy(), probs.numpy()
