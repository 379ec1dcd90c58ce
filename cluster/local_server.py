"""Running the REST app without Ray: uvicorn in the foreground or on a background thread."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_forever(app: ASGIApp, host: str, port: int, log_level: str = "info") -> None:
    """Blocks; Ctrl-C / SIGTERM stop it (uvicorn's handlers) and run the app's shutdown."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


class BackgroundServer:
    """uvicorn on a daemon thread: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="tpserve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the local server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
