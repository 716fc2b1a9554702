"""`finetune check`: the dataset doctor over a folder or manifest, before any training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.data.doctor import CheckResult, check_dataset
from finetune.data.facts import FactsCache
from finetune.files import check_writable_file, guarded, write_text
from finetune.run_dir import check_destination_file


def check(
    *, data: str | Path, extensions: Sequence[str] | None = None, json_out: str | Path | None = None, progress: bool = True
) -> CheckResult:
    """The dataset doctor over `data`; with `json_out`, every finding is also written there."""
    if json_out is not None:
        check_writable_file(Path(json_out), what="--json", example="check.json")  # before decoding every image, not after
        check_destination_file(json_out, what="--json")
    result = check_dataset(data, extensions=extensions or IMAGE_EXTENSIONS, progress=progress, cache=FactsCache.default())
    if json_out is not None:
        with guarded(Path(json_out), atomic=True):
            write_text(Path(json_out), json.dumps(result.to_dict(), indent=1, default=str))
    return result
