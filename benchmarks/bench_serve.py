"""`finetune serve` against calling `Predictor` in-process: p50/p95 latency per request (one image each) and images
per second with 1 and 16 concurrent clients, micro-batching on (5 ms window, up to 16 images) and off.

The model: ResNet-18 (random init) at 64 px trained for one epoch on the hymenoptera photos (../shared), or on a
synthetic folder when those are absent; requests send the val photos' JPEG bytes (decode included, as in predict).
The server is uvicorn in a thread of this process on 127.0.0.1; clients are threads using http.client.
Run: python benchmarks/bench_serve.py [--requests 48]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune import train
from finetune.config.loading import recipe_from_dict
from finetune.server.app import make_app
from finetune.server.background import BackgroundServer
from finetune.server.model import open_model

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
RECIPE = {
    "seed": 0,
    "data": {"batch_size": 16, "num_workers": 0},
    "model": {"name": "resnet18", "pretrained": False},
    "transforms": {"input_size": 64, "train": "light"},
    "train": {"epochs": 1, "lr": 0.001},
}


def _data(tmp: Path) -> Path:
    if HYMENOPTERA.is_dir():
        return HYMENOPTERA
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 12)):
        for name in ("ants", "bees"):
            (tmp / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "data" / split / name / f"{i}.jpg", quality=90)
    return tmp / "data"


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _http_client(port: int) -> Callable[[tuple[str, bytes]], None]:
    def send(item: tuple[str, bytes]) -> None:
        body, kind = _multipart(*item)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:200]
        json.loads(response.read())
        connection.close()

    return send


def _measure(call: Callable[[tuple[str, bytes]], None], items: list[tuple[str, bytes]], clients: int) -> dict[str, float]:
    """Each request timed alone; img/s over the whole burst."""

    def timed(item: tuple[str, bytes]) -> float:
        started = time.perf_counter()
        call(item)
        return time.perf_counter() - started

    call(items[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(timed, items))
    wall = time.perf_counter() - started
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "img_per_s": len(items) / wall,
    }


def run(*, requests: int = 48) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        trained = train(recipe=recipe_from_dict(RECIPE), data=_data(tmp), out=tmp / "run", progress=False)
        photos = sorted((_data(tmp) / "val").rglob("*.jpg"))
        items = [(photos[i % len(photos)].name, photos[i % len(photos)].read_bytes()) for i in range(requests)]
        model = open_model(trained.run_dir)
        predictor = model.predictor
        paths = {p.name: p for p in photos}
        for clients in (1, 16):
            rows.append(
                {"how": "Predictor.predict in-process", "clients": clients}
                | _measure(lambda item: predictor.predict([paths[item[0]]]), items, clients)
            )
            for window in (5.0, 0.0):
                app = make_app(model, max_batch=16, batch_window_ms=window)
                with BackgroundServer(app) as server:
                    row = _measure(_http_client(server.port), items, clients)
                    sizes = server.server.config.app.state.batcher.batch_sizes
                label = f"HTTP, micro-batching {'on (5 ms, max 16)' if window else 'off'}"
                rows.append({"how": label, "clients": clients} | row | {"mean_batch": float(np.mean(sizes))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    started = time.perf_counter()
    rows = run(requests=args.requests)
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}; {args.requests} requests of one image each")
    print("| how | clients | p50 ms | p95 ms | img/s | images per forward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "1"
        print(f"| {r['how']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['img_per_s']:.1f} | {batch} |")
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
