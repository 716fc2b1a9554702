"""finetune serve: a real uvicorn on 127.0.0.1 (a free port) answers /predict as `finetune predict` does, refuses bad
input with a JSON error naming the file and keeps serving, batches concurrent requests, serves an exported .onnx,
stops cleanly (SIGTERM too), and its page works in a real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA, REPO, make_folder, tiny_recipe

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from finetune import export, predict, train  # noqa: E402
from finetune.config.loading import recipe_from_dict  # noqa: E402
from finetune.errors import RunDirError, UsageError  # noqa: E402
from finetune.server.app import make_app  # noqa: E402
from finetune.server.background import BackgroundServer  # noqa: E402
from finetune.server.model import open_model  # noqa: E402
from finetune.server.uploads import Limits  # noqa: E402

THRESHOLD = 0.4  # the tiny model's confidences straddle it: some answers are 'unknown'


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Assorted modes (grey, palette, RGBA, 16-bit, CMYK, EXIF-rotated, a GIF named .jpg) and real photos."""
    folder = make_folder(tmp_path_factory.mktemp("serve") / "data", per_class=8)
    files = sorted(p for p in folder.rglob("*") if p.is_file())[:8]
    if HYMENOPTERA.is_dir():
        files += (
            sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:3] + sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:3]
        )
    return files


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    data = make_folder(tmp_path_factory.mktemp("serve_run") / "data", per_class=8)
    recipe = recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25}, eval={"tta": ["hflip"]}))
    return train(recipe=recipe, data=data, out=data.parent / "run", progress=False).run_dir


@pytest.fixture(scope="module")
def server(run):
    app = make_app(open_model(run, min_confidence=THRESHOLD), max_batch=16, batch_window_ms=20)
    with BackgroundServer(app) as background:
        yield background


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def _post(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _predict_files(url: str, paths: list[Path]) -> tuple[int, Any]:
    return _post(url + "predict", *_multipart([(p.name, p.read_bytes()) for p in paths]))


def _assert_same_as_predict(answers: list[dict], table, class_names: list[str]) -> None:
    assert len(answers) == len(table)
    for answer, row in zip(answers, table.to_dict("records")):
        assert answer["label"] == row["predicted_label"]
        assert answer["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        ranked = [(e["label"], e["probability"]) for e in answer["top_k"]]
        for rank in range(1, len(class_names) + 1):
            if f"top{rank}_label" in row:
                assert ranked[rank - 1][0] == row[f"top{rank}_label"]
                assert ranked[rank - 1][1] == pytest.approx(row[f"top{rank}_prob"], abs=1e-5)


def _same(a: dict, b: dict) -> bool:
    """One answer equals another up to float noise (a forward over a different batch)."""
    probs = [a["probabilities"][c] - b["probabilities"][c] for c in a["probabilities"]]
    return a["file"] == b["file"] and a["label"] == b["label"] and max(map(abs, probs)) < 1e-5


def test_predict_over_http_equals_finetune_predict(server, run, images):
    status, body = _predict_files(server.url, images)
    assert status == 200, body
    table = predict(run=run, inputs=images, progress=False, min_confidence=THRESHOLD)
    assert [a["file"] for a in body["predictions"]] == [p.name for p in images]
    _assert_same_as_predict(body["predictions"], table, ["cat", "dog", "eel"])
    assert any(a["unknown"] and a["label"] == "unknown" for a in body["predictions"]) or (table["confidence"] >= THRESHOLD).all()
    # one image as a raw body and as base64 JSON: the same answer
    status, raw = _post(server.url + f"predict?file={images[0].name}", images[0].read_bytes(), "image/jpeg")
    assert status == 200 and _same(raw["predictions"][0], body["predictions"][0])
    payload = json.dumps({"image": base64.b64encode(images[0].read_bytes()).decode(), "file": images[0].name}).encode()
    status, coded = _post(server.url + "predict", payload, "application/json")
    assert status == 200 and _same(coded["predictions"][0], body["predictions"][0])


def test_bad_input_is_a_json_error_naming_the_file_and_the_server_keeps_serving(server, images, tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("not a picture")
    status, body = _predict_files(server.url, [images[0], note])
    assert status == 415 and body["file"] == "notes.txt" and body["reason"] == "not_an_image" and "notes.txt" in body["error"]
    status, body = _post(server.url + "predict?file=empty.png", b"", "image/png")
    assert status == 400 and body["reason"] == "empty" and "empty.png" in body["error"]
    status, body = _post(server.url + "predict", b'{"image": "%%%"}', "application/json")
    assert status == 400 and body["reason"] == "bad_request"
    status, body = _post(server.url + "predict", *_multipart([]))
    assert status == 400
    assert _get(server.url + "health") == {"status": "ok"}
    assert _predict_files(server.url, [images[0]])[0] == 200


def test_limits_are_checked_from_the_header(run, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)).save(big)
    limits = Limits(max_bytes=len(big.read_bytes()) + 10, max_pixels=100_000)
    with BackgroundServer(make_app(open_model(run), limits=limits)) as small:
        status, body = _predict_files(small.url, [big])
        assert status == 413 and body["reason"] == "too_many_pixels" and "120,000 pixels" in body["error"]
        status, body = _post(small.url + "predict?file=huge.jpg", b"\xff" * (limits.max_bytes + 1), "image/jpeg")
        assert status == 413 and body["reason"] == "too_large" and "huge.jpg" in body["error"]
        assert _get(small.url + "health") == {"status": "ok"}


def test_48_requests_from_8_parallel_clients_all_succeed_and_are_batched(server, images):
    sent = [images[i % len(images)] for i in range(48)]
    before = len(server.server.config.app.state.batcher.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: _predict_files(server.url, [p]), sent))
    assert all(status == 200 for status, _ in answers)
    assert [body["predictions"][0]["file"] for _, body in answers] == [p.name for p in sent]
    first = {p.name: body["predictions"][0] for p, (_, body) in zip(sent, answers)}
    for path, (_, body) in zip(sent, answers):  # batched with other requests or not: the same numbers
        assert body["predictions"][0]["confidence"] == pytest.approx(first[path.name]["confidence"], abs=1e-5)
    sizes = server.server.config.app.state.batcher.batch_sizes[before:]
    assert sum(sizes) == 48 and max(sizes) > 1  # concurrent requests shared forwards


def test_metadata_and_page(server, run):
    meta = _get(server.url + "metadata")
    assert meta["class_names"] == ["cat", "dog", "eel"] and meta["task"] == "single_label"
    assert meta["model_name"] == "resnet18" and meta["reject_threshold"] == THRESHOLD and meta["temperature"] > 0
    assert meta["input"]["size"] == 32 and meta["input"]["tta"] == ["hflip"] and meta["input"]["resize"]["crop"] == 32
    reported = json.loads((run / "report" / "metrics.json").read_text())
    assert meta["test_metrics"]["accuracy"] == reported["accuracy"]
    assert meta["test_metrics"]["ci95"]["accuracy"] == reported["ci95"]["accuracy"]
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
    assert "<script src" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert "innerHTML" not in page and "test accuracy" in page
    body = _get(server.url + "openapi.json")["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "application/octet-stream"} <= set(body)
    with urllib.request.urlopen(server.url + "docs", timeout=30) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()


def test_page_escapes_names():
    from finetune.server.page import render_page

    page = render_page({"model_name": "<script>alert(1)</script>", "class_names": ["</script><b>x"], "task": "single_label"})
    assert "<script>alert(1)" not in page and "</script><b>" not in page and "&lt;script&gt;" in page


def test_the_server_stops_cleanly(run):
    background = BackgroundServer(make_app(open_model(run))).start()
    assert _get(background.url + "health") == {"status": "ok"}
    assert background.stop(timeout=15)
    with pytest.raises(OSError):
        socket.create_connection((background.host, background.port), timeout=2).close()


def test_options_are_checked_before_loading(run):
    from finetune import serve

    with pytest.raises(RunDirError, match="does not exist"):
        serve(run=run / "nope")
    with pytest.raises(UsageError, match="--max-batch 0"):
        serve(run=run, max_batch=0)
    with pytest.raises(UsageError, match="--batch-window-ms -1"):
        serve(run=run, batch_window_ms=-1)
    with pytest.raises(UsageError, match="not both"):
        serve(run=run, min_confidence=0.5, reject="auto", target_accuracy=0.9)


def test_without_the_serve_extra_the_message_names_it(monkeypatch):
    import importlib.util

    from finetune.runs.serve import require_serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "multipart" else real(name, *a))
    with pytest.raises(UsageError, match=r"needs python-multipart: pip install '\.\[serve\]'"):
        require_serve()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_exported_onnx_is_served_from_the_cli_and_stops_on_sigterm(run, images):
    pytest.importorskip("onnxruntime")
    exported = export(run=run, formats="onnx", progress=False).files["onnx"]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "finetune", "serve", str(exported), "--port", str(port), "--batch-window-ms", "0", "-q"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(url + "health")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
                time.sleep(0.3)
        status, body = _predict_files(url, images)
        assert status == 200
        _assert_same_as_predict(body["predictions"], predict(run=exported, inputs=images, progress=False), ["cat", "dog", "eel"])
        meta = _get(url + "metadata")
        assert meta["source"] == "exported" and meta["test_metrics"]["accuracy"] is not None
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    # uvicorn finishes the requests in flight, closes the socket, then re-raises SIGTERM (the conventional exit status)
    errors = process.stderr.read().decode()
    assert code in (0, -signal.SIGTERM) and "Traceback" not in errors, errors[-2000:]


class DevTools:
    """Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: answers out; JSON ending in NUL)."""

    def __init__(self, profile: str) -> None:
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        flags += ["--window-size=900,700", "--hide-scrollbars"]
        shell = f'exec chromium "$@" 3<&{to_chrome} 4>&{from_chrome}'
        self.process = subprocess.Popen(
            ["bash", "-c", shell, "chromium", *flags, "about:blank"],
            pass_fds=(to_chrome, from_chrome),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next = b"", 0
        self.session: str | None = None

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next:
                    assert "error" not in answer, (method, answer["error"])
                    return answer["result"]
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"Chromium did not answer {method} within {timeout} s"
            self._buffer += os.read(self._from_chrome, 1 << 20)

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expression} stayed empty for {timeout} s")

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (CI installs Debian's chromium)")
def test_page_in_headless_chromium_uploads_an_image_and_shows_the_label(server, run, images, tmp_path):
    photo = images[-1]
    expected = predict(run=run, inputs=[photo], progress=False, min_confidence=THRESHOLD)["predicted_label"][0]
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(profile)
        try:
            target = browser.send("Target.createTarget", url=server.url)["targetId"]
            browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            assert "accuracy" in browser.wait_for(
                "document.readyState === 'complete' && document.getElementById('facts').textContent"
            )
            root = browser.send("DOM.getDocument")["root"]["nodeId"]
            node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            browser.send("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
            label = browser.wait_for("document.getElementById('label').textContent")
            bars = browser.evaluate("document.querySelectorAll('#bars .row').length")
            browser.wait_for("document.getElementById('preview').complete && document.getElementById('preview').naturalWidth")
            shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.close()
    assert label == expected and bars == 3
    (tmp_path / "page.png").write_bytes(shot)
    keep = os.environ.get("FINETUNE_SERVE_SCREENSHOT")  # where to keep it for a person to look at
    if keep:
        Path(keep).write_bytes(shot)
    with Image.open(tmp_path / "page.png") as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.005  # text, bars and the photo: not a blank page
