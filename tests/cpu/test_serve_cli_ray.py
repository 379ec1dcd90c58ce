"""`tpserve serve api_server` over a Ray it starts itself: it answers, and SIGTERM,
whether it comes while the app deploys or while it serves, stops the app and the
Ray processes it started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tpserve.cluster.local_server import free_port

pytestmark = pytest.mark.slow


def raylets() -> int:
    out = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout
    return len(out.split())


def start(log_path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tpserve.cluster.cli", "serve", "api_server",
           "--server-port", str(port), "--device", "cpu", "--instance-num", "4"]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_for(log_path, text: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log_path.read_text():
            return
        assert proc.poll() is None, log_path.read_text()[-2000:]
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} within {timeout_s} s:\n{log_path.read_text()[-2000:]}")


def stop_and_check(proc: subprocess.Popen, log_path, raylets_before: int) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 90 s after SIGTERM:\n{log_path.read_text()[-2000:]}")
    assert "tpserve: shutting down" in log_path.read_text()
    deadline = time.monotonic() + 30
    while raylets() > raylets_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert raylets() == raylets_before, "the Ray the command started is still running"


@pytest.mark.parametrize("when", ["while deploying", "while serving"])
def test_sigterm_stops_app_and_ray(tmp_path, when):
    before = raylets()
    port = free_port()
    log = tmp_path / "server.log"
    proc = start(log, port)
    if when == "while deploying":
        wait_for(log, "Adding 1 replica", proc)
    else:
        wait_for(log, "Ctrl-C stops", proc)
        body = {"model": "tpserve-demo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    stop_and_check(proc, log, before)
