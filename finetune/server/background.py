"""The app served from a background thread on a free local port: for notebooks, tests and the benchmark.

>>> with BackgroundServer(make_app(model)) as server:
...     urllib.request.urlopen(server.url + "health")
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from finetune.errors import UsageError


class BackgroundServer:
    """uvicorn in a thread, listening on `host` at a port the OS picked; stopped (requests in flight finished) on exit."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", start_timeout: float = 30.0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UsageError(f"the server did not start on {self.url} within {self.start_timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> bool:
        """Ask uvicorn to finish (as SIGTERM does) and wait; True when the thread ended in time."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()
        return not self.thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
