"""What a user hands a trained model: files, folders (searched recursively), PIL images and numpy arrays."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from finetune.data.decode import as_rgb
from finetune.data.doctor import PREDICTION_ADVICE, screen_samples
from finetune.data.facts import examine_image
from finetune.data.loader import UNREADABLE
from finetune.data.members import is_shard_folder
from finetune.data.scan import list_images
from finetune.errors import DataError
from finetune.inference.predictions import Predictions

log = logging.getLogger(__name__)
ImageInput = str | Path | np.ndarray | Image.Image


def as_list(inputs: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One input or several, as a list."""
    return [inputs] if isinstance(inputs, (str, Path, np.ndarray, Image.Image)) else list(inputs)


def check_inputs_exist(inputs: Sequence[ImageInput]) -> None:
    missing = next((Path(item) for item in inputs if isinstance(item, (str, Path)) and not Path(item).exists()), None)
    if missing is not None:
        raise DataError(f"input {missing} does not exist; pass image files or folders")
    special = next((Path(item) for item in inputs if isinstance(item, (str, Path)) and not _file_or_folder(Path(item))), None)
    if special is not None:  # reading a FIFO would wait for a writer forever; a device could be endless
        raise DataError(
            f"input {special} is not a regular file or folder (a FIFO, socket or device?); pass image files or folders"
        )


def _file_or_folder(path: Path) -> bool:
    return path.is_file() or path.is_dir()


def input_paths(inputs: Sequence[str | Path], extensions: Sequence[str]) -> list[str]:
    """Files as given, and images in folders (recursive, with the run's extensions)."""
    paths: list[str] = []
    for item in map(Path, inputs):
        if is_shard_folder(item):
            raise DataError(
                f"{item} is a shard folder; predict reads image files and folders: evaluate on it with "
                f"'finetune eval RUN --data {item}', or predict on the images it was written from"
            )
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
    frame = pd.DataFrame({"path": paths, "label": "", "split": ""})
    screened = screen_samples(frame, policy=policy, progress=progress, advice=PREDICTION_ADVICE)
    if screened.samples.empty:
        first = screened.skipped.iloc[0]
        raise DataError(
            f"none of the {len(screened.skipped)} input image(s) could be decoded, e.g. {first['path']} ({first['reason']})"
        )
    return set(screened.samples["path"])


def drop_unreadable(preds: Predictions, *, policy: str) -> Predictions:
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
        raise DataError(
            f"{len(paths)} input image(s) cannot be decoded and the run's data.bad_images is 'fail': {', '.join(paths[:5])}; "
            "replace the files, or leave them out of the input"
        )
    log.warning("skipped %d unreadable image(s), e.g. %s (%s); %s", len(paths), paths[0], why, PREDICTION_ADVICE.skipped)
    kept = preds.subset(np.flatnonzero(~bad))
    kept.targets = np.full(len(kept.paths), -1)
    return kept
