"""`finetune serve`: the trained model behind HTTP, answering as `finetune predict` does (FastAPI + uvicorn)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

from finetune.errors import RunDirError, UsageError

log = logging.getLogger(__name__)


def require_serve() -> None:
    """One line naming the extra when fastapi, uvicorn or python-multipart is not installed."""
    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"finetune serve needs {', '.join(missing).replace('multipart', 'python-multipart')}: "
            "pip install '.[serve]' (or pip install fastapi uvicorn python-multipart)"
        )


def serve(
    *,
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    batch_window_ms: float = 5.0,
    max_bytes: int = 20 * 2**20,
    max_pixels: int = 50_000_000,
    max_files: int = 64,
    min_confidence: float | None = None,
    reject: str | None = None,
    target_accuracy: float | None = None,
) -> None:
    """Serve a run folder, checkpoint or exported .onnx until stopped (Ctrl-C or SIGTERM: requests in flight finish).

    POST /predict answers what `finetune predict` writes for the same files (the run's decode, resize, test-time views,
    temperature and, with `min_confidence` or `reject="auto"` + `target_accuracy`, its reject rule); images from
    concurrent requests are batched within `batch_window_ms` up to `max_batch` (0 ms: no batching). GET / is a page to
    drop an image on; GET /metadata, /health and /docs (OpenAPI) describe the server.
    """
    require_serve()
    _check_options(
        run=Path(run), port=port, max_batch=max_batch, batch_window_ms=batch_window_ms, limits=(max_bytes, max_pixels, max_files)
    )
    import uvicorn

    from finetune.server.app import make_app
    from finetune.server.model import open_model
    from finetune.server.uploads import Limits

    model = open_model(Path(run), min_confidence=min_confidence, reject=reject, target_accuracy=target_accuracy)
    limits = Limits(max_bytes=max_bytes, max_pixels=max_pixels, max_files=max_files)
    app = make_app(model, max_batch=max_batch, batch_window_ms=batch_window_ms, limits=limits)
    log.info("serving %s on http://%s:%d/ (page), /predict, /metadata, /docs; Ctrl-C stops", run, host, port)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown: the normal way out
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    log.info("stopped serving %s", run)


def _check_options(*, run: Path, port: int, max_batch: int, batch_window_ms: float, limits: tuple[int, int, int]) -> None:
    if not run.exists():
        raise RunDirError(f"{run} does not exist; pass a run folder, a checkpoint or an exported .onnx file")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port from 1 to 65535 (0: any free port)")
    if max_batch < 1:
        raise UsageError(f"--max-batch {max_batch}: at least 1 image per forward, e.g. 16")
    if not 0 <= batch_window_ms <= 1000:
        raise UsageError(f"--batch-window-ms {batch_window_ms}: from 0 (no batching) to 1000 ms, e.g. 5")
    if min(limits) < 1:
        raise UsageError("--max-bytes, --max-pixels and --max-files must be positive")
