#!/usr/bin/env python3
"""What the serving path alone costs per streamed token: no model, no GPU.

    python scripts/bench_serving_transport.py [--concurrency 16] [--num-prompts 96]

The REST tests' fake engine streams a token every --token-delay-ms per request.
The same load (bench_serving.py) runs against it in three setups, each in a
fresh process:

- in-process: the starlette app under uvicorn;
- ray-serve: the Ray Serve app with the settings `tpserve serve api_server`
  uses (cluster/serve_env.py);
- ray-serve-defaults: the same app with Serve's default settings.

Any TPOT above the token delay is transport; the ratio to in-process is what
Serve adds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "cpu"  # api_fakes.py: the fake engine
MODES = ("in-process", "ray-serve", "ray-serve-defaults")


def serve_one(mode: str, args: argparse.Namespace, out: Path) -> None:
    sys.path[:0] = [str(FAKES), str(Path(__file__).parent)]
    import bench_serving

    from tpserve.cluster.local_server import free_port

    port = free_port()
    delay = str(args.token_delay_ms / 1e3)
    if mode == "in-process":
        import uvicorn
        from api_fakes import make_serving

        from tpserve.cluster.openai_api import build_api_app

        app = build_api_app(make_serving(session_len=100000, token_delay=float(delay)))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.1)
    else:
        import ray
        from ray import serve

        from tpserve.cluster import serve_env
        from tpserve.cluster.app import build_app

        if mode == "ray-serve":
            serve_env.set_cluster_env()
        else:
            serve_env.REPLICA_ENV.clear()
        path = os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": "fake", "device": "cpu", "session_len": "100000",
                             "engine_factory": "api_fakes:serving_factory",
                             "token_delay": delay}), name="tpserve", route_prefix="/")
    common = ["--base-url", f"http://127.0.0.1:{port}", "--endpoint", "completions",
              "--input-len", "32", "--output-len", str(args.output_len)]
    bench_serving.main(common + ["--num-prompts", "4"])  # warm-up
    bench_serving.main(common + ["--num-prompts", str(args.num_prompts), "--max-concurrency",
                                 str(args.concurrency), "--json", str(out)])
    os._exit(0)  # leaves Ray and the server threads behind at once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--token-delay-ms", type=float, default=5.0)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        serve_one(args.mode, args, args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--mode", mode, "--out", str(out),
                   "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
                   "--output-len", str(args.output_len),
                   "--token-delay-ms", str(args.token_delay_ms)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[mode] = json.loads(out.read_text())
    base = results["in-process"]
    print(f"fake engine, a token every {args.token_delay_ms} ms; concurrency {args.concurrency}, "
          f"{args.num_prompts} requests, {args.output_len} tokens out")
    print(f"{'setup':18} {'TPOT ms':>8} {'x in-proc':>9} {'TTFT ms':>8} {'failed':>6}")
    for mode, r in results.items():
        print(f"{mode:18} {r['mean_tpot_ms']:8.2f} {r['mean_tpot_ms'] / base['mean_tpot_ms']:9.3f} "
              f"{r['mean_ttft_ms']:8.1f} {r['failed']:6d}")


if __name__ == "__main__":
    main()
