"""scripts/bench_serving.py against the fake-engine server on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_fakes import MODEL_ID, make_serving
from tpserve.cluster.local_server import BackgroundServer
from tpserve.cluster.openai_api import build_api_app

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_summary_formulas():
    bench = load_bench()
    r = bench.RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5,
                            itl=[0.1, 0.1, 0.1, 0.1])
    s = bench.summarize([r, bench.RequestResult(error="boom")], duration=2.0)
    assert s["completed"] == 1 and s["failed"] == 1 and s["errors"] == ["boom"]
    assert s["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1)
    assert s["median_ttft_ms"] == pytest.approx(100.0) and s["p99_e2el_ms"] == pytest.approx(500.0)
    assert s["output_throughput"] == 2.5 and s["request_throughput"] == 0.5


@pytest.mark.parametrize("endpoint, extra", [("chat", ["--request-rate", "50"]),
                                              ("completions", ["--max-concurrency", "3"])])
def test_bench_against_server(tmp_path, endpoint, extra):
    app = build_api_app(make_serving(session_len=512, token_delay=0.001))
    out = tmp_path / "r.json"
    with BackgroundServer(app) as url:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--base-url", url, "--endpoint", endpoint,
                               "--num-prompts", "8", "--input-len", "16", "--output-len", "12",
                               "--json", str(out), *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 12 and result["config"]["model"] == MODEL_ID
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_tpot_ms",
                "p99_itl_ms", "mean_e2el_ms"):
        assert result[key] > 0, key
    assert all(len(r["itl"]) == 11 for r in result["requests"])
    assert "Serving Benchmark Result" in proc.stdout
