"""`finetune explain`: Grad-CAM heatmaps for any images, beside the picture the model saw, with a table of where the heat is."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from finetune.data.decode import printable
from finetune.data.doctor import PREDICTION_ADVICE, screen_samples
from finetune.errors import DataError, UsageError, did_you_mean
from finetune.evaluation.explain import Explainer
from finetune.files import atomic_write, guarded, write_table
from finetune.inference.inputs import check_inputs_exist, input_paths
from finetune.inference.predictor import Predictor
from finetune.run_dir import check_destination

log = logging.getLogger(__name__)
BORDER_WARNING = 0.5  # more than half of the heat in the outer tenth of the frame (a third of the area)
SHOWN = 448  # at least this many pixels per side of each half of a saved picture (a 224 px input, doubled)
PIXELATED = 64  # inputs this small are enlarged by whole pixels (crisp blocks); larger ones smoothly


@dataclass
class ExplainResult:
    folder: Path
    table: pd.DataFrame  # path, class, confidence, picture, border_share, note


def _side_by_side(seen: np.ndarray, overlay: np.ndarray, caption: str) -> Image.Image:
    """The image the model saw, its Grad-CAM overlay, and under them what the heat is evidence for."""
    side = max(seen.shape[:2])
    if side <= PIXELATED:
        scale, resample = float(max(1, -(-SHOWN // side))), Image.Resampling.NEAREST
    else:
        scale, resample = max(1.0, SHOWN / side), Image.Resampling.LANCZOS
    size = (round(seen.shape[1] * scale), round(seen.shape[0] * scale))
    halves = [Image.fromarray(a).resize(size, resample) for a in (seen, overlay)]
    band = 30
    picture = Image.new("RGB", (halves[0].width * 2 + 8, halves[0].height + band), "white")
    picture.paste(halves[0], (0, 0))
    picture.paste(halves[1], (halves[0].width + 8, 0))
    ImageDraw.Draw(picture).text((6, halves[0].height + 7), caption, fill="black", font=ImageFont.load_default(size=16))
    return picture


def _png(picture: Image.Image) -> Callable[[BinaryIO], None]:
    return lambda handle: picture.save(handle, format="PNG")


def _class_index(class_names: list[str], name: str | None) -> int | None:
    if name is None:
        return None
    if name not in class_names:
        raise UsageError(f"--class {name} is not a class of this model{did_you_mean(name, class_names)}; classes: {class_names}")
    return class_names.index(name)


def explain(
    *, run: str | Path, inputs: Sequence[str | Path], out: str | Path, target_class: str | None = None, progress: bool = True
) -> ExplainResult:
    """Grad-CAM of the predicted class (or `target_class`) for each image; pictures and explanations.csv into `out`."""
    check_inputs_exist(inputs)
    folder = check_destination(out, reads=[Path(run)])
    predictor = Predictor(run)
    loaded = predictor.trained
    wanted = _class_index(loaded.class_names, target_class)
    frame = pd.DataFrame({"path": input_paths(inputs, loaded.recipe.data.extensions), "label": "", "split": ""})
    screened = screen_samples(frame, policy=loaded.recipe.data.bad_images, progress=progress, advice=PREDICTION_ADVICE)
    paths = list(screened.samples["path"])
    if not paths:
        raise DataError("none of the input images could be decoded")
    preds = predictor.predictions(paths, progress=progress, desc="predict")
    classes = [wanted if wanted is not None else int(c) for c in preds.predicted]
    explainer = Explainer(loaded.bundle, loaded.image)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, found in enumerate(explainer.explain(paths, classes)):
        picture = f"{n:04d}_{Path(printable(found.path)).stem[:60]}.png"
        name, confidence = loaded.class_names[found.class_index], float(preds.probs[n, found.class_index])
        caption = f"Grad-CAM for '{name}' ({confidence:.0%}): red = where the model found its evidence"
        with guarded(folder / picture):  # a full disk or a size limit: one line
            atomic_write(folder / picture, _png(_side_by_side(found.seen, found.overlay, caption)), durable=False)
        border = found.border_share
        rows.append(
            {
                "path": found.path,
                "class": name,
                "confidence": confidence,
                "picture": picture,
                "border_share": border,
                "note": "most of the heat is on the border: frame, watermark or background?" if border > BORDER_WARNING else "",
            }
        )
    table = pd.DataFrame(rows)
    with guarded(folder / "explanations.csv"):
        write_table(table, folder / "explanations.csv", float_format="%.4f")
    log.info("Grad-CAM at %s: %d picture(s) in %s", explainer.where, len(rows), folder)
    return ExplainResult(folder=folder, table=table)
