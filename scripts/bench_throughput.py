"""Offline throughput: N ShareGPT-like requests (random lengths around ~200 in,
~180 out, ignore_eos) through tpserve, and through transformers' generate in
padded batches as the baseline, on the same card in the same run.

    python scripts/bench_throughput.py --shape llama3-8b --num-prompts 512
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (card, free_gpu_memory, hf_model, model_config,  # noqa: E402
                          workspace_for)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        in_len = max(4, int(rng.lognormvariate(5.1, 0.6)))   # median ~165, mean ~200
        out_len = max(4, int(rng.lognormvariate(5.0, 0.5)))  # median ~150, mean ~170
        out.append(([rng.randrange(100, 20000) for _ in range(min(in_len, 1024))],
                    min(out_len, 512)))
    return out


def run_tpserve(llm, reqs) -> tuple[float, int, float]:
    """Seconds for all requests, the engine's steps, and their mean running batch."""
    from tpserve.engine.sampling_params import SamplingParams

    engine = llm.engine
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, (ids, out_len) in enumerate(reqs):
        engine.add_request(f"tp-{i}", ids, SamplingParams(max_tokens=out_len, temperature=0,
                                                          ignore_eos=True))
    steps = running = 0
    for _ in engine.steps():
        steps += 1
        running += len(engine.scheduler.running)
    torch.cuda.synchronize()
    return time.perf_counter() - start, steps, running / max(1, steps)


def run_hf(model, reqs, batch: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):  # left padding
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        n = max(o for _, o in chunk)  # static batching: every row runs to the longest
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--hf-prompts", type=int, default=64, help="baseline runs on a prefix")
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--quant-policy", type=int, default=0, help="8: int8 KV cache")
    p.add_argument("--cache-max-entry-count", type=float, default=0.85,
                   help="KV cache: fraction of free memory (< 1) or blocks (>= 1); lower it to "
                        "measure at a KV-bound batch")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--awq-group", type=int, default=0, help="> 0: random 4-bit AWQ weights")
    p.add_argument("--label", default="tpserve", help="engine name in the table")
    p.add_argument("--workspace", default=None)
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="one step at a time (the next is scheduled once the last is read)")
    p.add_argument("--no-mixed-graphs", action="store_true",
                   help="launch steps that are not pure decodes eagerly (tp=1; for comparison)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose-variants", action="store_true",
                   help="list each Triton variant first met in the timed run")
    args = p.parse_args()

    from tpserve.engine.llm import LLM
    from tpserve.kernels.testing import TritonVariants

    cfg = model_config(args.shape, args.layers)
    ws = workspace_for(cfg, args.workspace, args.tp, args.awq_group)
    reqs = workload(args.num_prompts)
    llm = LLM(ws, cache_max_entry_count=args.cache_max_entry_count, session_len=2048,
              max_batch_size=args.max_batch_size, quant_policy=args.quant_policy,
              async_scheduling=not args.no_async_scheduling)
    blocks = llm.engine.pool.num_blocks
    if args.no_mixed_graphs:
        llm.executor.mixed_graphs = None
    # warm-up: enough requests for mixed steps of many sizes, so that Triton compiles
    # its kernels' variants here and not inside the timed run
    run_tpserve(llm, workload(min(64, args.num_prompts), seed=1))
    with TritonVariants() as variants:
        secs, steps, batch = run_tpserve(llm, reqs)
    print(f"Triton variants first met in the timed run: {len(variants.seen)} "
          f"({variants.summary()})")
    if args.verbose_variants:
        print("\n".join(f"{name} {key}" for name, key in variants.seen))
    out_tokens = sum(o for _, o in reqs)
    stats = llm.engine.stats()
    rows = [dict(engine=args.label, requests=len(reqs), seconds=secs, req_s=len(reqs) / secs,
                 out_tok_s=out_tokens / secs, kv_blocks=blocks, preemptions=stats.num_preemptions,
                 steps=steps, mean_batch=batch, ms_per_step=1e3 * secs / steps)]
    llm.shutdown()
    del llm
    free_gpu_memory()
    if not args.no_baseline:
        sub = reqs[:args.hf_prompts]
        model = hf_model(cfg)
        run_hf(model, workload(2, seed=1), 2)
        secs = run_hf(model, sub, args.hf_batch)
        rows.append(dict(engine="transformers", requests=len(sub), seconds=secs,
                         req_s=len(sub) / secs, out_tok_s=sum(o for _, o in sub) / secs))
    print(f"\n{card()}  shape={args.shape} layers={cfg.num_layers} "
          f"quant_policy={args.quant_policy}")
    print(f"{'engine':<18}{'reqs':>6}{'req/s':>9}{'out tok/s':>11}{'x HF':>7}"
          f"{'KV blocks':>10}{'preempt':>8}{'steps':>7}{'batch':>7}{'ms/step':>8}")
    base = rows[-1]["out_tok_s"] if rows[-1]["engine"] == "transformers" else float("nan")
    for r in rows:
        print(f"{r['engine']:<18}{r['requests']:>6}{r['req_s']:>9.2f}{r['out_tok_s']:>11.0f}"
              f"{r['out_tok_s'] / base:>7.2f}{r.get('kv_blocks', ''):>10}"
              f"{r.get('preemptions', ''):>8}{r.get('steps', ''):>7}"
              f"{r.get('mean_batch', 0):>7.1f}{r.get('ms_per_step', 0):>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
