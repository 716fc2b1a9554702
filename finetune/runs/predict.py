"""`finetune predict`: calibrated predictions for new images, with the reject option ('unknown' below a threshold)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.data.decode import as_rgb
from finetune.data.doctor import screen_samples
from finetune.data.facts import examine_image
from finetune.data.loader import UNREADABLE
from finetune.data.scan import list_images
from finetune.deploy.package import image_batches
from finetune.deploy.runtime import Exported, is_exported, load_exported
from finetune.errors import CheckpointError, DataError, UsageError
from finetune.evaluation.inference import Predictions
from finetune.evaluation.metrics import predictions_table
from finetune.evaluation.reject import RejectRule, risk_coverage, threshold_for_accuracy
from finetune.evaluation.tta import tta_views, view_pixels
from finetune.files import check_writable_file, write_table, write_text
from finetune.run_dir import RunDir
from finetune.runs.evaluate import checkpoint_path, predict_paths
from finetune.training.checkpoint import LoadedModel, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


def _check_reject_options(min_confidence: float | None, reject: str | None, target_accuracy: float | None) -> None:
    if min_confidence is not None and reject is not None:
        raise UsageError("give --min-confidence P or --reject auto --target-accuracy A, not both")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"--min-confidence {min_confidence}: a probability from 0 to 1, e.g. 0.8")
    if reject is not None and reject != "auto":
        raise UsageError(f"--reject {reject}: the only choice is 'auto' (with --target-accuracy A)")
    if reject == "auto" and (target_accuracy is None or not 0.0 < target_accuracy <= 1.0):
        raise UsageError("--reject auto needs --target-accuracy A, an accuracy from 0 to 1 such as 0.95")
    if target_accuracy is not None and reject is None:
        raise UsageError("--target-accuracy goes with --reject auto")


def auto_threshold(loaded: LoadedModel, target_accuracy: float) -> RejectRule:
    """The threshold whose answered validation images reach `target_accuracy` (calibrated, from best.pt's own outputs)."""
    if loaded.validation is None:
        raise CheckpointError(
            "this checkpoint keeps no validation predictions (an older finetune); use --min-confidence P instead"
        )
    logits, targets = loaded.validation
    probs = Predictions.from_logits([""] * len(targets), logits, targets, temperature=loaded.temperature).probs
    rule = threshold_for_accuracy(probs, targets, target_accuracy)
    if rule is None:
        best = risk_coverage(probs, targets).iloc[0]
        raise UsageError(
            f"no confidence threshold reaches {target_accuracy:.1%} accuracy on the validation split (its most confident "
            f"answers reach {best['accuracy']:.1%}); lower --target-accuracy, or use --min-confidence P"
        )
    return rule


ImageInput = str | Path | np.ndarray | Image.Image


def check_inputs_exist(inputs: Sequence[ImageInput]) -> None:
    missing = next((Path(item) for item in inputs if isinstance(item, (str, Path)) and not Path(item).exists()), None)
    if missing is not None:
        raise DataError(f"input {missing} does not exist; pass image files or folders")


def input_paths(inputs: Sequence[str | Path], extensions: Sequence[str]) -> list[str]:
    """Files as given, and images in folders (recursive, with the run's extensions)."""
    paths: list[str] = []
    for item in map(Path, inputs):
        paths += [str(p) for p in list_images(item, extensions)] if item.is_dir() else [str(item)]
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(extensions)})")
    return paths


@dataclass
class Pictures:
    """What to classify, in the order given: decodable files (folders expanded) and in-memory pictures as RGB arrays."""

    sources: list[str | np.ndarray]
    names: list[str]  # the CSV's `path` column: the file, or '<array 3>' / '<PIL image 3>' for the 4th input

    @classmethod
    def gather(
        cls, inputs: Sequence[ImageInput], extensions: Sequence[str], *, policy: str, progress: bool, screen: bool = True
    ) -> Pictures:
        """Every input in order; with `screen`, files that do not decode are left out first (one decoding pass)."""
        sources: list[str | np.ndarray] = []
        names: list[str] = []
        for position, item in enumerate(inputs):
            if isinstance(item, (str, Path)):
                found = input_paths([item], extensions)
                sources += found
                names += found
            elif isinstance(item, (np.ndarray, Image.Image)):
                kind = "array" if isinstance(item, np.ndarray) else "PIL image"
                sources.append(as_rgb(item, where=f"input {position} ({kind})"))
                names.append(f"<{kind} {position}>")
            else:
                raise DataError(
                    f"input {position} is a {type(item).__name__}; pass a file path, a folder, a PIL image or a numpy array"
                )
        if not screen:
            return cls(sources=sources, names=names)
        readable = _readable([s for s in sources if isinstance(s, str)], policy, progress)
        keep = [i for i, s in enumerate(sources) if not isinstance(s, str) or s in readable]
        return cls(sources=[sources[i] for i in keep], names=[names[i] for i in keep])


def _readable(paths: list[str], policy: str, progress: bool) -> set[str]:
    if not paths:
        return set()
    screened = screen_samples(pd.DataFrame({"path": paths, "label": "", "split": ""}), policy=policy, progress=progress)
    if screened.samples.empty:
        first = screened.skipped.iloc[0]
        raise DataError(
            f"none of the {len(screened.skipped)} input image(s) could be decoded, e.g. {first['path']} ({first['reason']})"
        )
    return set(screened.samples["path"])


def _drop_unreadable(preds: Predictions, *, policy: str) -> Predictions:
    """The predictions of the images that decoded; the others are listed in the log (or stop with policy 'fail')."""
    bad = preds.targets == UNREADABLE
    if not bad.any():
        return preds
    paths = [p for p, b in zip(preds.paths, bad) if b]
    first = examine_image(paths[0])  # the reason, for the first one only: the others are listed by path
    why = f"{first.problem}: {first.detail}" if first.detail else (first.problem or "cannot be decoded")
    if bad.all():
        raise DataError(f"none of the {len(paths)} input image(s) could be decoded, e.g. {paths[0]} ({why})")
    if policy == "fail":
        raise DataError(f"{len(paths)} input image(s) cannot be decoded and data.bad_images is 'fail': {', '.join(paths[:5])}")
    log.warning("skipped %d unreadable image(s), e.g. %s (%s)", len(paths), paths[0], why)
    kept = preds.subset(np.flatnonzero(~bad))
    kept.targets = np.full(len(kept.paths), -1)
    return kept


class Predictor:
    """A trained run, checkpoint or exported file loaded once, for repeated predictions (notebooks, services).

    >>> predictor = finetune.load("runs/ants")
    >>> predictor.predict([PIL.Image.open("a.jpg"), "more_images/"])   # a DataFrame, one row per image
    """

    def __init__(self, run: str | Path) -> None:
        self.source = Path(run)
        self.exported: Exported | None = None
        self.loaded: LoadedModel | None = None
        self.run_dir: RunDir | None = None
        if is_exported(self.source):
            self.exported = load_exported(self.source)
        else:
            checkpoint = checkpoint_path(self.source)
            self.loaded = model_from_checkpoint(load_checkpoint(checkpoint))
            self.run_dir = RunDir.of_checkpoint(checkpoint)

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names if self.loaded is not None else self.exported.class_names  # type: ignore[union-attr]

    def predict(
        self,
        inputs: Sequence[ImageInput] | ImageInput,
        *,
        progress: bool = False,
        min_confidence: float | None = None,
        reject: str | None = None,
        target_accuracy: float | None = None,
    ) -> pd.DataFrame:
        """Classify files, folders (recursive), PIL images and uint8 arrays; one DataFrame row per image, in order."""
        items = [inputs] if isinstance(inputs, (str, Path, np.ndarray, Image.Image)) else list(inputs)
        check_inputs_exist(items)
        _check_reject_options(min_confidence, reject, target_accuracy)
        if self.exported is not None:
            if reject is not None:
                raise UsageError(
                    "--reject auto needs the run's validation predictions; with an exported model use --min-confidence P"
                )
            return self._exported_table(items, progress=progress, min_confidence=min_confidence)
        if reject == "auto" and target_accuracy is not None:
            rule = auto_threshold(self._loaded, target_accuracy)
            min_confidence = rule.threshold
            _remember(self.run_dir, rule)
        return self._run_table(items, progress=progress, min_confidence=min_confidence)

    @property
    def _loaded(self) -> LoadedModel:
        if self.loaded is None:
            raise UsageError(f"{self.source} is an exported model; it has no run to read")
        return self.loaded

    def _run_table(self, items: Sequence[ImageInput], *, progress: bool, min_confidence: float | None) -> pd.DataFrame:
        loaded = self._loaded
        data = loaded.recipe.data
        pictures = Pictures.gather(items, data.extensions, policy=data.bad_images, progress=progress, screen=False)
        targets = [-1] * len(pictures.sources)
        preds = predict_paths(
            loaded, pictures.sources, targets, progress=progress, desc="predict", names=pictures.names, unreadable="mark"
        )
        preds = _drop_unreadable(preds, policy=data.bad_images)
        return predictions_table(preds, loaded.class_names, top_k=loaded.recipe.eval.top_k, min_confidence=min_confidence)

    def _exported_table(self, items: Sequence[ImageInput], *, progress: bool, min_confidence: float | None) -> pd.DataFrame:
        """The same table from an exported file: finetune's decode and resize, then the file's own graph (once per
        test-time view listed in its metadata, probabilities averaged)."""
        model = self.exported
        if model is None:
            raise UsageError(f"{self.source} is not an exported model")
        pictures = Pictures.gather(items, IMAGE_EXTENSIONS, policy="skip", progress=progress)
        views = tta_views(model.meta.get("tta") or [])
        probs = [
            np.mean([model.run(view_pixels(batch, view))[1] for view in views], axis=0)
            for batch in image_batches(pictures.sources, model.image)
        ]
        preds = Predictions(paths=pictures.names, probs=np.concatenate(probs), targets=np.full(len(pictures.names), -1))
        return predictions_table(preds, model.class_names, top_k=int(model.meta.get("top_k", 5)), min_confidence=min_confidence)


def predict(
    *,
    run: str | Path,
    inputs: Sequence[ImageInput],
    out: str | Path | None = None,
    progress: bool = True,
    min_confidence: float | None = None,
    reject: str | None = None,
    target_accuracy: float | None = None,
) -> pd.DataFrame:
    """Classify image files and folders (searched recursively), PIL images and uint8 arrays; returns and optionally
    writes a CSV.

    `run` is a run folder, a checkpoint, or a file written by `finetune export` (.onnx, TorchScript .pt): the same
    CSV either way. Probabilities are calibrated with the run's temperature (and averaged over `eval.tta` views).
    `min_confidence` (or `reject="auto"` with a `target_accuracy`, threshold chosen on the validation split) answers
    'unknown' below the threshold.
    """
    check_inputs_exist(inputs)
    _check_reject_options(min_confidence, reject, target_accuracy)
    if out is not None:
        check_writable_file(Path(out))  # before any image is read
    table = Predictor(run).predict(
        inputs, progress=progress, min_confidence=min_confidence, reject=reject, target_accuracy=target_accuracy
    )
    if out is not None:
        write_table(table, Path(out), float_format="%.6f")
        log.debug("wrote %d predictions to %s", len(table), out)  # the command prints it
    return table


def _remember(run: RunDir | None, rule: RejectRule) -> None:
    """Keep the chosen threshold with the run (RUN/reject.json), so later calls and people can see it."""
    log.info(
        "reject below confidence %.4f: on the validation split %.1f%% of images answered at %.1f%% accuracy",
        rule.threshold,
        100 * (rule.coverage or 0),
        100 * (rule.accuracy or 0),
    )
    if run is not None:
        write_text(run.reject, json.dumps(rule.to_dict(), indent=1))
