#!/usr/bin/env python3
"""Load test of any OpenAI-compatible server, reporting what vLLM's benchmark_serving reports.

    python scripts/bench_serving.py --base-url http://127.0.0.1:23333 --num-prompts 200 \
        --request-rate 8 --input-len 512 --output-len 128 --json results.json

Requests arrive as a Poisson process at --request-rate per second (inf = all at
once), optionally capped at --max-concurrency in flight. Prompts are random words
of about --input-len tokens, or come from --dataset (JSON lines with "prompt", or
a ShareGPT JSON list). Every request streams; token counts come from the usage
chunk (stream_options.include_usage), so they are the server's own.
Reported: request and token throughput; TTFT, TPOT = (latency - TTFT) / (output - 1),
ITL (each gap between streamed chunks) and end-to-end latency: mean, median, p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp

WORDS = ("time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea").split()


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


def dataset_prompts(path: str, n: int, seed: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # ShareGPT: first human turn of each conversation
        prompts = [c["conversations"][0]["value"] for c in json.loads(text)
                   if c.get("conversations")]
    else:
        prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    if not prompts:
        sys.exit(f"no prompts found in {path}")
    rng = random.Random(seed)
    return [rng.choice(prompts) for _ in range(n)]


def request_body(args: argparse.Namespace, prompt: str) -> dict:
    body = {"model": args.model, "max_tokens": args.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature,
            "ignore_eos": args.ignore_eos}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error chunk")
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(_chunk_text(c) for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.ttft > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _chunk_text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(args: argparse.Namespace, prompts: list[str]) -> tuple[list[RequestResult], float]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = args.base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def limited(prompt: str) -> RequestResult:
            async with limit:
                return await one_request(session, url, request_body(args, prompt), headers)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats(name: str, values: list[float]) -> dict:
    ms = [v * 1000 for v in values] or [0.0]
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"p99_{name}_ms": p99}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    summary = {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
    }
    summary |= _stats("ttft", [r.ttft for r in ok])
    summary |= _stats("tpot", [(r.latency - r.ttft) / (r.output_tokens - 1)
                               for r in ok if r.output_tokens > 1])
    summary |= _stats("itl", [gap for r in ok for gap in r.itl])
    summary |= _stats("e2el", [r.latency for r in ok])
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:10]
    return summary


def print_summary(summary: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    for key, value in summary.items():
        if key == "errors":
            continue
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<45}{text:>15}")
    for error in summary.get("errors", []):
        print(f"error: {error}")
    print("=" * 60)


async def fetch_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as r:
            r.raise_for_status()
            return (await r.json())["data"][0]["id"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:23333")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128, help="words per random prompt (~tokens)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", default=None, help="JSON lines with 'prompt', or ShareGPT JSON")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="write the results as JSON to this file ('-' or no value: stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_prompts < 1 or args.request_rate <= 0:
        sys.exit("--num-prompts must be >= 1 and --request-rate > 0")
    args.model = args.model or asyncio.run(fetch_model(args.base_url, args.api_key))
    prompts = (dataset_prompts(args.dataset, args.num_prompts, args.seed) if args.dataset
               else random_prompts(args.num_prompts, args.input_len, args.seed))
    results, duration = asyncio.run(run_load(args, prompts))
    summary = summarize(results, duration)
    summary["config"] = {k: (str(v) if v == float("inf") else v)
                         for k, v in vars(args).items() if k != "api_key"}
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(summary | {"requests": [asdict(r) for r in results]}, f, indent=2)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
