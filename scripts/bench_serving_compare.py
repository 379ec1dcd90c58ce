#!/usr/bin/env python3
"""The same load against the server in-process (--no-ray) and through the Ray Serve app.

    python scripts/bench_serving_compare.py --workspace WS [--concurrency 16] [--num-prompts 128]

Starts `tpserve serve api_server WS --no-ray`, runs bench_serving.py against
it, stops it; then the same with Ray Serve (a local Ray started by the
command). Prints both summaries and the ratio of their mean TPOT and TTFT:
what Ray Serve's proxy and handle add per token.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving  # noqa: E402


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no healthy server at {url} within {timeout_s:.0f} s")


def run_one(label: str, server_args: list[str], args: argparse.Namespace, port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tpserve.cluster.cli", "serve", "api_server", args.workspace,
           "--server-port", str(port), "--instance-num", str(args.max_batch_size),
           "--cache-max-entry-count", "0.5", "--log-level", "warning", *server_args]
    log = open(Path(args.log_dir) / f"server_{label}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, args.startup_timeout)
        common = ["--base-url", url, "--endpoint", "completions", "--input-len",
                  str(args.input_len), "--output-len", str(args.output_len)]
        _quiet(lambda: bench_serving.main(common + ["--num-prompts", "4"]))  # warm-up
        summary_file = Path(args.log_dir) / f"serving_{label}.json"
        bench_serving.main(common + ["--num-prompts", str(args.num_prompts),
                                     "--max-concurrency", str(args.concurrency),
                                     "--json", str(summary_file)])
        return json.loads(summary_file.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _quiet(fn):
    with open(os.devnull, "w") as null:
        old, sys.stdout = sys.stdout, null
        try:
            return fn()
        finally:
            sys.stdout = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workspace", required=True)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--log-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"in-process": run_one("inprocess", ["--no-ray"], args, 23401),
               "ray-serve": run_one("rayserve", [], args, 23402)}
    print(f"\nconcurrency {args.concurrency}, {args.num_prompts} requests, "
          f"{args.input_len} words in, {args.output_len} tokens out")
    print(f"{'server':<12}{'req/s':>8}{'out tok/s':>11}{'TTFT ms':>9}{'TPOT ms':>9}{'ITL p99':>9}")
    for name, s in results.items():
        print(f"{name:<12}{s['request_throughput']:>8.2f}{s['output_throughput']:>11.0f}"
              f"{s['mean_ttft_ms']:>9.1f}{s['mean_tpot_ms']:>9.2f}{s['p99_itl_ms']:>9.2f}")
    a, b = results["in-process"], results["ray-serve"]
    print(f"Ray Serve / in-process: TPOT {b['mean_tpot_ms'] / a['mean_tpot_ms']:.3f}, "
          f"TTFT {b['mean_ttft_ms'] / a['mean_ttft_ms']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
