"""`finetune serve`: the model behind HTTP, with a page to drop an image on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.base import Debug, Quiet, app, session


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="Run folder, checkpoint, or a file from 'finetune export' (.onnx).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most images in one forward across concurrent requests.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="How long an image waits for others to batch with (0: off).")] = 5.0,
    max_bytes: Annotated[int, typer.Option(help="Largest image file accepted, in bytes.")] = 20 * 2**20,
    max_pixels: Annotated[int, typer.Option(help="Most pixels (width x height) accepted, read from the header.")] = 50_000_000,
    max_files: Annotated[int, typer.Option(help="Most images in one request.")] = 64,
    min_confidence: Annotated[
        float | None, typer.Option(help="Answer 'unknown' below this (calibrated) top probability.")
    ] = None,
    reject: Annotated[str | None, typer.Option(help="'auto': choose the threshold on the validation split.")] = None,
    target_accuracy: Annotated[float | None, typer.Option(help="With --reject auto: the accuracy to reach.")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Serve the model over HTTP: POST /predict, GET / (drop an image), /metadata, /health, /docs."""
    with session(quiet, debug):
        from finetune import api

        api.serve(
            run=run,
            host=host,
            port=port,
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            max_files=max_files,
            min_confidence=min_confidence,
            reject=reject,
            target_accuracy=target_accuracy,
        )
