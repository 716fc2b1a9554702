"""ONNX: torch.onnx.export with the torch.export-based exporter (dynamo=True, onnxscript translating the graph to
Conv/Relu/ReduceMean/Gemm for ResNets, a dynamic batch axis), metadata in metadata_props, int8 static quantization
with onnxruntime, and a runner. Opsets below 18 still go through the deprecated TorchScript-based exporter (see
MAINTAINED_MIN_OPSET)."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.deploy.metadata import from_strings, seal, to_strings
from finetune.deploy.package import PackagedClassifier, pause_garbage_collection
from finetune.errors import UsageError

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18
# The torch.export-based exporter writes opset 18 and newer. Below that it calls onnx's version converter, which fails
# on a timm ResNet's ReduceMean and leaves the file at opset 18 (logging the failure, raising nothing); so a lower opset
# is written by the TorchScript-based exporter, the only one that writes it correctly (onnxruntime >= 1.14 reads 18).
MAINTAINED_MIN_OPSET = 18
RUNTIME_MIN_OPSET = 7  # onnxruntime guarantees opset 7 and newer (it has no call that says how new)


def opset_range() -> tuple[int, int]:
    """The opsets this installation can write and run: from the newest of torch.onnx's and onnxruntime's minimum to
    the oldest of torch.onnx's and onnx's maximum."""
    import onnx
    from torch.onnx import _constants

    low = max(int(_constants.ONNX_MIN_OPSET), RUNTIME_MIN_OPSET)
    return low, min(int(_constants.ONNX_MAX_OPSET), int(onnx.defs.onnx_opset_version()))


def check_opset(opset: object) -> int:
    """`--opset`, refused with the supported range before any work."""
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise UsageError(
            f"--opset {opset!r}: this installation (torch {torch.__version__}) exports and runs ONNX opsets {low} to "
            f"{high}; the maintained exporter writes {MAINTAINED_MIN_OPSET} and newer (default {DEFAULT_OPSET})"
        )
    return opset


def require_onnx(*, exporting: bool = True) -> None:
    """One line naming the extra when onnx / onnxruntime (and, to export, onnxscript) are not installed."""
    needed = ["onnx", "onnxruntime", *(["onnxscript"] if exporting else [])]
    if any(importlib.util.find_spec(name) is None for name in needed):
        names = ", ".join(needed[:-1]) + f" and {needed[-1]}"
        raise UsageError(
            f"ONNX {'export needs' if exporting else 'files need'} {names}: "
            f"pip install '.[export]' (or pip install {' '.join(needed)})"
        )


def exporter_name(opset: int) -> str:
    """Which exporter `export_onnx` uses at `opset`, in the words the metadata's 'exporter' entry records."""
    if opset < MAINTAINED_MIN_OPSET:
        return f"torch.onnx.export (TorchScript-based, opset {opset})"
    return f"torch.onnx.export (torch.export-based, dynamo=True, opset {opset})"


def export_onnx(package: PackagedClassifier, path: Path, *, size: int, opset: int = DEFAULT_OPSET) -> None:
    """Write `package` as ONNX with inputs/outputs named image / logits, probs and a dynamic batch axis, through
    torch.export (opset 18 and newer) or the TorchScript-based exporter (older opsets: see MAINTAINED_MIN_OPSET)."""
    if opset < MAINTAINED_MIN_OPSET:
        log.warning(
            "opset %d is written by torch.onnx's TorchScript-based exporter, deprecated in PyTorch; the maintained "
            "exporter writes opset %d and newer. HINT: pass --opset %d (onnxruntime >= 1.14 reads it)",
            opset,
            MAINTAINED_MIN_OPSET,
            DEFAULT_OPSET,
        )
        _export_torchscript_based(package, path, size=size, opset=opset)
        return
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # not 1: torch.export specialises an axis of size 1
    with pause_garbage_collection():
        torch.onnx.export(
            package.eval(),
            (example,),
            str(path),
            dynamo=True,
            external_data=False,  # one self-contained file: the weights of a classifier are far below protobuf's 2 GB
            opset_version=opset,
            verbose=False,  # its progress lines go to stdout otherwise
            input_names=["image"],
            output_names=["logits", "probs"],
            dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        )


def _export_torchscript_based(package: PackagedClassifier, path: Path, *, size: int, opset: int) -> None:
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    batch = {0: "batch"}
    with warnings.catch_warnings(), pause_garbage_collection():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracer notices
        torch.onnx.export(
            package.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits", "probs"],
            dynamic_axes={"image": batch, "logits": batch, "probs": batch},
        )


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Replace the file's metadata_props with `meta` (JSON values)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in to_strings(seal(meta)).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an ONNX file ({} when it has none)."""
    import onnx

    return from_strings({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})


class OnnxRunner:
    """An onnxruntime CPU session over an exported file: uint8 NHWC batch in, (logits, probs) out."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.session.run(["logits", "probs"], {"image": np.ascontiguousarray(images, dtype=np.uint8)})
        return logits, probs


QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape"]


def quantize_int8(source: Path, target: Path, calibration: Iterator[np.ndarray]) -> None:
    """onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on `calibration` batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(calibration, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=QUANTIZED_OPS,  # the input scaling and the probabilities stay float: they sum to 1
        )
