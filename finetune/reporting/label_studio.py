"""The queue as a Label Studio import file: one task per image, the model's suggestion as a pre-annotation.

Label Studio shows an image from a URL. By default each task points at Label Studio's local-files route with the
image's absolute path (`/data/local-files/?d=home/me/pool/a.jpg`), which it serves when started with
`LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true` and `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/`. With an image root
(`https://files.example.org/pool`), each task points at that URL plus the image's path relative to the unlabelled
folder. The labelling config must name its choices `choice` and its image `image`:
`<View><Image name="image" value="$image"/><Choices name="choice" toName="image">...</Choices></View>`.
Each task also carries the image's local path in `data.path`: Label Studio keeps task data as imported, so its JSON
export is read back (`--data`, finetune/data/label_tools.py) whatever URL served the image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

LOCAL_FILES = "/data/local-files/?d="


def image_url(path: str, *, base: Path, image_root: str | None) -> str:
    """Where Label Studio finds `path`: under `image_root` (relative to `base`), else the local-files route."""
    if image_root is None:
        return LOCAL_FILES + quote(os.path.abspath(path).lstrip("/"))
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return image_root.rstrip("/") + "/" + quote(Path(relative).as_posix())


def label_studio_tasks(
    queue: pd.DataFrame, confidence: Mapping[str, float], *, base: Path, image_root: str | None, model_version: str
) -> list[dict[str, Any]]:
    """One task per queued image, in queue order, its suggested label a prediction scored by the model's probability."""
    return [
        {
            "data": {"image": image_url(row.path, base=base, image_root=image_root), "path": row.path, "rank": rank + 1},
            "predictions": [
                {
                    "model_version": model_version,
                    "score": float(confidence[row.path]),
                    "result": [
                        {
                            "from_name": "choice",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [str(row.suggested_label)]},
                        }
                    ],
                }
            ],
        }
        for rank, row in enumerate(queue.itertuples())
    ]
