"""The HTTP app: /predict (multipart files, raw bytes or base64 JSON), /metadata, /health, the drop-an-image page at
/ and FastAPI's OpenAPI docs at /docs. `make_app` builds it around a `ServedModel`; uvicorn runs it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from finetune.server.batcher import MicroBatcher
from finetune.server.model import ServedModel
from finetune.server.page import render_page
from finetune.server.uploads import Limits, UploadError, decode_upload, too_large

PREDICT_BODY = {  # what /docs shows for POST /predict: the three ways to send images
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["files"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "byte"}, "file": {"type": "string"}},
                "required": ["image"],
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def make_app(model: ServedModel, *, max_batch: int = 16, batch_window_ms: float = 5.0, limits: Limits | None = None) -> FastAPI:
    """The app serving `model`; images from concurrent requests are batched within `batch_window_ms` (0: off)."""
    limits = limits or Limits()
    batcher: MicroBatcher[dict[str, Any]] = MicroBatcher(model.classify, max_batch=max_batch, window_s=batch_window_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"finetune: {model.facts.get('model_name')}", lifespan=lifespan)
    app.state.batcher = batcher
    metadata = {**model.facts, "class_names": model.class_names, "top_k": model.top_k, "reject_threshold": model.min_confidence}

    @app.exception_handler(UploadError)
    async def refused(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(metadata))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def describe() -> dict[str, Any]:
        return metadata

    @app.post("/predict", openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(request: Request) -> dict[str, Any]:
        """Classify one or more images: multipart field `files`, a raw image body, or JSON {"image": base64}."""
        uploads = await read_uploads(request, limits)
        images = await asyncio.gather(
            *(asyncio.to_thread(decode_upload, data, file=name, limits=limits) for name, data in uploads)
        )
        names = [name for name, _ in uploads]
        return {"predictions": await batcher.submit(list(images), names)}

    return app


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every image in the request; oversized bodies are refused from Content-Length first."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = int(request.headers.get("content-length") or 0)
    if kind == "multipart/form-data":
        if declared > limits.max_request_bytes:
            raise too_large("the request", declared, Limits(max_bytes=limits.max_request_bytes))
        return await _multipart(request, limits)
    name = request.query_params.get("file") or request.headers.get("x-filename") or "body"
    if kind == "application/json":
        if declared > limits.max_bytes * 4 // 3 + 4096:
            raise too_large(name, declared * 3 // 4, limits)
        return [_from_json(await _body(request, name, limits.max_bytes * 4 // 3 + 4096, limits), name)]
    if declared > limits.max_bytes:
        raise too_large(name, declared, limits)
    return [(name, await _body(request, name, limits.max_bytes, limits))]


async def _multipart(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=limits.max_files)
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException on malformed or excess parts
        raise UploadError(
            f"the multipart body cannot be read ({getattr(exc, 'detail', exc)}); send up to {limits.max_files} images in field 'files'",
            file="the request",
            reason="bad_request",
            status=400,
        ) from None
    files = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    if not files:
        raise UploadError(
            "no images in the multipart field 'files'; send them as files=@image.jpg",
            file="the request",
            reason="empty",
            status=400,
        )
    uploads = []
    for position, upload in enumerate(files):
        name = upload.filename or f"file {position}"
        if upload.size is not None and upload.size > limits.max_bytes:
            raise too_large(name, upload.size, limits)
        uploads.append((name, await upload.read()))
    await form.close()
    return uploads


async def _body(request: Request, name: str, cap: int, limits: Limits) -> bytes:
    """The raw body, refused as soon as it passes `cap` (a chunked upload declares no length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large(name, size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


def _from_json(body: bytes, name: str) -> tuple[str, bytes]:
    """(name, image bytes) from {"image": "<base64>", "file": "optional name"}."""
    try:
        payload = json.loads(body)
        name = str(payload.get("file") or name)
        return name, base64.b64decode(payload["image"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise UploadError(
            f'the JSON body is not {{"image": "<base64 of the file>"}} ({type(exc).__name__}); send one base64-encoded image',
            file=name,
            reason="bad_request",
            status=400,
        ) from None
