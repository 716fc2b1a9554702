"""Micro-batching: images from concurrent requests go through the model together, one forward at a time.

The first image waiting opens a short window (`window_s`); whatever arrives in it, up to `max_batch` images, is
predicted in one call on a worker thread, so the event loop keeps accepting requests. Window 0 turns batching off:
each request is predicted on its own, still one forward at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Waiting:
    image: np.ndarray
    name: str
    answer: asyncio.Future[Any]


class MicroBatcher(Generic[T]):
    """`await submit(images, names)` returns `run(images, names)`'s answers for those images, in order."""

    def __init__(self, run: Callable[[list[np.ndarray], list[str]], list[T]], *, max_batch: int, window_s: float) -> None:
        self.run, self.max_batch, self.window_s = run, max(1, max_batch), max(0.0, window_s)
        self.batch_sizes: list[int] = []  # how many images each forward held (the benchmark and tests read it)
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._one_at_a_time: asyncio.Lock | None = None

    async def start(self) -> None:
        self._one_at_a_time = asyncio.Lock()
        if self.window_s > 0:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve_queue())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def submit(self, images: list[np.ndarray], names: list[str]) -> list[T]:
        if self._one_at_a_time is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if self._queue is None:  # batching off
            async with self._one_at_a_time:
                return await self._forward(images, names)
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(image, name, loop.create_future()) for image, name in zip(images, names)]
        for item in waiting:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.answer for item in waiting)))

    async def _forward(self, images: list[np.ndarray], names: list[str]) -> list[T]:
        self.batch_sizes.append(len(images))
        return await asyncio.to_thread(self.run, images, names)

    async def _gather(self, queue: asyncio.Queue[_Waiting]) -> list[_Waiting]:
        """The first waiting image and what joins it within the window (and what is already queued), up to max_batch."""
        loop = asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [item for item in batch if not item.answer.done()]  # a client that left cancelled its answer

    async def _serve_queue(self) -> None:
        if self._queue is None or self._one_at_a_time is None:
            raise RuntimeError("the batcher's queue is made when the server starts; start it before serving")
        while True:
            batch = await self._gather(self._queue)
            if not batch:
                continue
            try:
                answers = await self._forward([item.image for item in batch], [item.name for item in batch])
            except Exception as exc:  # every waiting request gets the error; the worker keeps serving
                log.exception("prediction failed for a batch of %d image(s)", len(batch))
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(exc)
                continue
            for item, answer in zip(batch, answers):
                if not item.answer.done():
                    item.answer.set_result(answer)
