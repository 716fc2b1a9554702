"""ONNX: torch.onnx.export (the TorchScript-based exporter: a plain graph of Conv/Relu/GlobalAveragePool/Gemm for ResNets,
with a dynamic batch axis), metadata in metadata_props, int8 static quantization with onnxruntime, and a runner."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.deploy.metadata import from_strings, to_strings
from finetune.deploy.package import PackagedClassifier
from finetune.errors import UsageError

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17


def require_onnx() -> None:
    """One line naming the extra when onnx / onnxruntime are not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError(
            "ONNX export needs onnx and onnxruntime: pip install -e '.[export]' (or pip install onnx onnxruntime)"
        ) from None


def export_onnx(package: PackagedClassifier, path: Path, *, size: int, opset: int = DEFAULT_OPSET) -> None:
    """Write `package` as ONNX with inputs/outputs named image / logits, probs and a dynamic batch axis."""
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    batch = {0: "batch"}
    with warnings.catch_warnings():
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
    for key, value in to_strings(meta).items():
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
            op_types_to_quantize=QUANTIZED_OPS,  # the input scaling and the softmax stay float: probabilities sum to 1
        )
