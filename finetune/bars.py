"""Progress bars: tqdm.auto (a widget in Jupyter, text in a terminal) over an iterable that is iterated once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], **options: Any) -> Any:
    """tqdm over `iterable`, creating exactly one iterator of it.

    tqdm.auto's class (`tqdm_asyncio`) calls `iter()` on what it wraps when it is made and again when it is
    iterated. For a DataLoader with workers that starts the workers twice and draws the shuffle order twice, so
    the order a run trains on depended on `num_workers` (and the cached and uncached paths differed). Giving tqdm
    one iterator, with the length it would have read, keeps both the order and the bar.
    """
    if "total" not in options and hasattr(iterable, "__len__"):
        options["total"] = len(iterable)  # type: ignore[arg-type]
    return tqdm(iter(iterable), **options)
