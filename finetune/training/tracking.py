"""Experiment trackers beside metrics.csv: TensorBoard (`log: [tensorboard]`) and MLflow (`log: [mlflow]`).

Per epoch: the metrics.csv row as scalars and the LR of every stage; after the report: its figures as images and
the resolved recipe as hyperparameters with the final scores. Both libraries are optional extras, checked before
any slow work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config.loading import flatten
from finetune.errors import RecipeError, UsageError
from finetune.files import atomic_write, guarded, write_text

log = logging.getLogger(__name__)

TAG_GROUPS = (("train_", "train"), ("val_", "val"), ("ema_val_", "val_ema"))
PACKAGES = {"tensorboard": ("tensorboard", "finetune[tensorboard]"), "mlflow": ("mlflow", "mlflow")}


def check_trackers(sinks: Sequence[str]) -> None:
    """A one-line error when a tracker the recipe names is not installed."""
    for sink in sinks:
        if sink in PACKAGES and importlib.util.find_spec(PACKAGES[sink][0]) is None:
            raise RecipeError(
                f"log: {sink} needs the {PACKAGES[sink][0]} package: pip install '{PACKAGES[sink][1]}', or remove it from log"
            )


def flat_params(tree: dict[str, Any]) -> dict[str, str | float | int | bool]:
    """A nested recipe as dotted keys with scalar values (lists and None as JSON text)."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in flatten(tree).items()}


def _finite(scalars: dict[str, Any]) -> dict[str, float]:
    numbers = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float, np.floating, np.integer))}
    return {k: v for k, v in numbers.items() if math.isfinite(v)}


def scalar_tags(row: dict[str, Any], lrs: dict[str, float]) -> dict[str, float]:
    """A metrics.csv row as tracker tags: train/loss, val/accuracy, val_ema/accuracy, lr/<stage>, time/epoch_seconds."""
    tags: dict[str, float] = {}
    for key, value in _finite(row).items():
        for prefix, group in TAG_GROUPS:
            if key.startswith(prefix):
                tags[f"{group}/{key[len(prefix) :]}"] = value
                break
    extra = {"phase": float(row["phase"]), "time/epoch_seconds": float(row["seconds"])}
    return tags | {f"lr/{stage}": lr for stage, lr in lrs.items()} | extra


class TensorBoardSink:
    """Event files in RUN/tensorboard; a resumed run hides the epochs logged after its last checkpoint. A write the OS
    refuses (full disk, size limit, read-only folder) is `disk_error`'s one line, with how to resume."""

    def __init__(self, folder: Path, *, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        with self._guarded():
            # the writer's own thread reports a refused write late, with a traceback: try one write first
            atomic_write(folder / ".writable", lambda handle: handle.write(b"ok"), durable=False)
            (folder / ".writable").unlink()
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=first_epoch if first_epoch > 1 else None)

    def _guarded(self) -> contextlib.AbstractContextManager[None]:
        return guarded(self.folder, resume=self.folder.parent)

    def epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        with self._guarded():
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, epoch)
            self.writer.flush()

    def image(self, tag: str, picture: np.ndarray, epoch: int) -> None:
        with self._guarded():
            self.writer.add_image(tag, picture, epoch, dataformats="HWC")

    def params(self, params: dict[str, Any], scores: dict[str, float]) -> None:
        with self._guarded():
            self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in scores.items()}, run_name="hparams")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a write already refused has been reported; closing must not hide it
            self.writer.close()


def _gist(exc: Exception, limit: int = 240) -> str:
    """The first sentences of an exception's message, on one line, within `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    kept = ""
    for sentence in text.split(". "):
        if kept and len(kept) + len(sentence) > limit:
            break
        kept = f"{kept}. {sentence}" if kept else sentence
    return kept[:limit].rstrip(".")


class MlflowSink:
    """One MLflow run per finetune run (its id kept in RUN/mlflow.json, so a resume continues the same one)."""

    def __init__(self, run_root: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        marker = run_root / "mlflow.json"
        run_id = json.loads(marker.read_text(encoding="utf-8"))["run_id"] if marker.exists() else None
        try:
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_root.name)
        except Exception as exc:  # any failure of the tracking server or store: the library's own message, one line
            raise UsageError(
                f"log: mlflow could not start a run at tracking URI {mlflow.get_tracking_uri()}: {_gist(exc)}; "
                "fix MLFLOW_TRACKING_URI (or the server), or remove mlflow from log"
            ) from None
        if run_id is None:
            write_text(marker, json.dumps({"run_id": active.info.run_id}))

    def epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=epoch)

    def image(self, tag: str, picture: np.ndarray, epoch: int) -> None:
        self.mlflow.log_image(picture, f"{tag}.png")

    def params(self, params: dict[str, Any], scores: dict[str, float]) -> None:
        self.mlflow.log_params(params)
        self.mlflow.log_metrics(scores)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """Every tracker of a run behind one interface (none at all for `log: [csv]`)."""

    def __init__(self, sinks: Sequence[str], run_root: Path, *, first_epoch: int = 1) -> None:
        check_trackers(sinks)
        self.sinks: list[Any] = []
        if "tensorboard" in sinks:
            self.sinks.append(TensorBoardSink(run_root / "tensorboard", first_epoch=first_epoch))
        if "mlflow" in sinks:
            try:
                self.sinks.append(MlflowSink(run_root))
            except Exception:
                self.close()  # the TensorBoard writer opened above
                raise

    def _each(self, call: str, *args: Any) -> None:
        """`sink.call(*args)` for every sink; a tracker that fails mid-run (server gone, disk full) is dropped with
        a warning, and training, metrics.csv and checkpoints go on."""
        for sink in list(self.sinks):
            try:
                getattr(sink, call)(*args)
            except Exception as exc:
                log.warning(
                    "%s stopped logging (%s: %s); the run goes on, metrics.csv has every epoch",
                    type(sink).__name__,
                    type(exc).__name__,
                    exc,
                )
                self.sinks.remove(sink)
                if call != "close":
                    with contextlib.suppress(Exception):  # end its run, so the next one in this process can start
                        sink.close()

    def epoch(self, epoch: int, row: dict[str, Any], lrs: dict[str, float]) -> None:
        self._each("epoch", epoch, scalar_tags(row, lrs))

    def figure(self, tag: str, path: Path | None, epoch: int) -> None:
        """A PNG the run wrote (confusion matrix, augmentation preview) as an image."""
        if path is None or not path.is_file() or not self.sinks:
            return
        from PIL import Image

        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self._each("image", tag, pixels, epoch)

    def finish(self, recipe: dict[str, Any], scores: dict[str, float]) -> None:
        self._each("params", flat_params(recipe), _finite(scores))

    def close(self) -> None:
        self._each("close")
