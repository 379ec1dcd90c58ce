"""Decode latency at small batches: tpserve vs transformers' generate, same card, same run.

    python scripts/bench_latency.py --shape llama3-8b --batch 1 8 --out-len 256
    python scripts/bench_latency.py --workspace WS --tp 2 --no-baseline     # tensor parallel
    python scripts/bench_latency.py --awq-group 128 --no-baseline            # random W4A16 weights
    python scripts/bench_latency.py --no-async-scheduling --label sync       # one step at a time

Prints tok/s, ms/token, MBU (bytes read per step over the measured copy
bandwidth of all the GPUs used) and the ratio to transformers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (card, copy_bandwidth, free_gpu_memory, hf_model,  # noqa: E402
                          kv_bytes, model_config, workspace_for, weight_bytes)


def time_tpserve(llm, batch: int, in_len: int, out_len: int) -> tuple[float, float]:
    """(seconds for prefill + first token, seconds per decode step)."""
    from tpserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    prompts = [torch.randint(100, 20000, (in_len,)).tolist() for _ in range(batch)]
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"lat-{time.monotonic_ns()}-{i}", p, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in engine.steps():  # as the server steps: async scheduling unless turned off
        steps += 1
        if first is None:
            torch.cuda.synchronize()
            first = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return first - start, (end - first) / max(1, steps - 1)


def time_hf(model, batch: int, in_len: int, out_len: int) -> tuple[float, float]:
    ids = torch.randint(100, 20000, (batch, in_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    ttft = run(1)
    total = run(out_len)
    return ttft, (total - ttft) / (out_len - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, same layer shape")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--in-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=256)
    p.add_argument("--workspace", default=None, help="reuse a workspace instead of a random one")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (a random workspace "
                   "is made for this tp; a given one must have it)")
    p.add_argument("--awq-group", type=int, default=0,
                   help="> 0: the workspace holds 4-bit AWQ weights with this group size")
    p.add_argument("--quant-policy", type=int, default=0, help="8: int8 KV cache")
    p.add_argument("--eager-mode", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="one step at a time (the next is scheduled once the last is read)")
    p.add_argument("--label", default="tpserve", help="engine name in the table")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from tpserve.engine.llm import LLM

    cfg = model_config(args.shape, args.layers)
    ws = workspace_for(cfg, args.workspace, args.tp, args.awq_group)
    bw = copy_bandwidth() * args.tp
    llm = LLM(ws, cache_max_entry_count=0.5, session_len=4096, quant_policy=args.quant_policy,
              eager_mode=args.eager_mode, async_scheduling=not args.no_async_scheduling)
    for b in args.batch:  # warm-up at each measured shape: Triton compiles per specialization
        time_tpserve(llm, b, args.in_len, 8)
    rows = []

    def step_bytes(b: int) -> float:  # weights + the KV cache at the mean context
        kv_value = 1.0 if args.quant_policy else 2.0
        return (weight_bytes(cfg, awq_group=args.awq_group)
                + kv_bytes(cfg, (args.in_len + args.out_len // 2) * b, kv_value))

    for b in args.batch:
        ttft, step = time_tpserve(llm, b, args.in_len, args.out_len)
        rows.append(dict(engine=args.label, batch=b, tp=args.tp, ttft_ms=ttft * 1e3, tpot_ms=step * 1e3,
                         tok_s=b / step, mbu=step_bytes(b) / step / bw))
    llm.shutdown()
    del llm
    free_gpu_memory()
    if not args.no_baseline:
        model = hf_model(cfg)
        for b in args.batch:
            ttft, step = time_hf(model, b, args.in_len, args.out_len)
            rows.append(dict(engine="transformers", batch=b, ttft_ms=ttft * 1e3,
                             tpot_ms=step * 1e3, tok_s=b / step, mbu=step_bytes(b) / step / bw))
    base = {r["batch"]: r["tok_s"] for r in rows if r["engine"] == "transformers"}
    print(f"\n{card()}  shape={args.shape} layers={cfg.num_layers} in={args.in_len} "
          f"out={args.out_len}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'engine':<18}{'batch':>6}{'tok/s':>10}{'ms/tok':>9}{'TTFT ms':>9}{'MBU':>7}{'x HF':>7}")
    for r in rows:
        ratio = r["tok_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(f"{r['engine']:<18}{r['batch']:>6}{r['tok_s']:>10.1f}{r['tpot_ms']:>9.2f}"
              f"{r['ttft_ms']:>9.1f}{r['mbu']:>7.1%}{ratio:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card(), bandwidth=bw, rows=rows), indent=2))


if __name__ == "__main__":
    main()
