"""torch-native files with the same contract as the ONNX file (uint8 NHWC in, logits and probs out), the metadata as the
extra file finetune.json, and a dynamic batch axis:

- an ExportedProgram archive (`.pt2`): `torch.export`, PyTorch's maintained path. `torch.export.load(path).module()`
  runs it with torch alone.
- a TorchScript archive: `torch.jit.trace`. torch.jit is deprecated upstream and torch.export writes no TorchScript, so
  this file stays only for consumers that read TorchScript (`torch.jit.load`, libtorch in C++) while torch still does.

Both are trusted files, like a pickle: torch.export.load unpickles what it cannot store as raw bytes.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.deploy.metadata import TORCHSCRIPT_EXTRA, seal
from finetune.deploy.package import PackagedClassifier, pause_garbage_collection
from finetune.files import atomic_write

PROGRAM_SUFFIX = ".pt2"


def export_torchscript(package: PackagedClassifier, path: Path, *, size: int, meta: dict[str, Any]) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), pause_garbage_collection():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(package.eval(), (example,))
        _save(lambda buffer: torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(seal(meta))}), path)


def _save(write: Callable[[io.BytesIO], object], path: Path) -> None:
    """The archive built in memory, then written atomically: torch's writer aborts the whole process (std::terminate)
    when a write to a path fails (full disk, size limit), while in memory its error never happens, and ours is
    the one-line disk error."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write(Path(path), lambda handle: handle.write(buffer.getbuffer()))


def export_program(package: PackagedClassifier, path: Path, *, size: int, meta: dict[str, Any]) -> None:
    """Write `package` as a torch.export ExportedProgram archive (`.pt2`) with `meta` inside."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # not 1: torch.export specialises an axis of size 1
    with pause_garbage_collection():
        program = torch.export.export(package.eval(), (example,), dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    _save(lambda buffer: torch.export.save(program, buffer, extra_files={TORCHSCRIPT_EXTRA: json.dumps(seal(meta))}), path)


def _archive_kind(path: Path) -> str | None:
    """'pt2' or 'torchscript' for an archive finetune export wrote (it carries extra/finetune.json), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not any(name.endswith(f"extra/{TORCHSCRIPT_EXTRA}") for name in names):
            return None
        marker = next((name for name in names if name.count("/") == 1 and name.endswith("/archive_format")), None)
        return "pt2" if marker is not None and archive.read(marker).strip() == b"pt2" else "torchscript"


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive written by finetune export (not a finetune checkpoint, which torch.load reads)."""
    return _archive_kind(path) == "torchscript"


def is_program(path: Path) -> bool:
    """An ExportedProgram archive (`.pt2`) written by finetune export."""
    return _archive_kind(path) == "pt2"


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of either archive."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(f"extra/{TORCHSCRIPT_EXTRA}"))
        return dict(json.loads(archive.read(name)))


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Save the archive again with new metadata (the graph is unchanged)."""
    if is_program(path):
        program = torch.export.load(str(path))
        # written beside and renamed: the loaded program may still read from the file it came from
        _save(lambda buffer: torch.export.save(program, buffer, extra_files={TORCHSCRIPT_EXTRA: json.dumps(seal(meta))}), path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        _save(lambda buffer: torch.jit.save(module, buffer, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(seal(meta))}), path)


class TorchScriptRunner:
    def __init__(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)))
        return logits.numpy(), probs.numpy()


class ProgramRunner:
    """An ExportedProgram archive on the CPU (exported in eval mode: the program keeps it)."""

    def __init__(self, path: Path) -> None:
        self.module = torch.export.load(str(path)).module()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)))
        return logits.numpy(), probs.numpy()
