"""Per-step cost of the tensor-parallel executor: how a step's batch reaches the ranks.

    python3 scripts/bench_tp.py --tp 2 --steps 200 [--model HF_FOLDER] [--device cpu]

"broadcast" (what RayExecutor does): one Ray call to rank 0, which sends the
batch to the other ranks over the gloo control group. "fan-out": ray.put the
batch once and call every rank with the same ObjectRef. Both drive the same
actors on a random Llama (or --model) with decode batches of --batch requests.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import ray
import torch


def random_llama(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32,
                      num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(1024)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t1").save_pretrained(folder)
    return folder


def decode_batch(batch_size: int, context: int, block_size: int):
    from tpserve.engine.forward_batch import ForwardBatch

    blocks = -(-(context + 1) // block_size)
    tables = [[b * blocks + i for i in range(blocks)] for b in range(batch_size)]
    return ForwardBatch.build([[7]] * batch_size, [context] * batch_size, tables, block_size)


def timed(fn, steps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--model", help="a Hugging Face folder (default: a random Llama)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from tpserve.engine.config import EngineConfig
    from tpserve.engine.convert import convert
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.engine.workspace import read_meta
    from tpserve.parallel.executor import RayExecutor

    tmp = Path(tempfile.mkdtemp(prefix="bench_tp-"))
    src = Path(args.model) if args.model else random_llama(tmp / "hf", args.hidden, args.layers)
    ws = convert("llama2", src, tmp / "ws", tp=args.tp, progress=False)
    blocks = args.batch * (-(-(args.context + 1) // 16))
    config = EngineConfig(cache_max_entry_count=blocks, cache_block_seq_len=16, device=args.device)
    ex = RayExecutor(args.tp, functools.partial(ModelRunner, ws, read_meta(ws), config),
                     device=args.device)
    batch = decode_batch(args.batch, args.context, 16)

    def fan_out() -> torch.Tensor:
        ref = ray.put(batch)
        return ray.get([w.step.remote(ref) for w in ex.workers])[0]

    broadcast, fanned = [], []
    for _ in range(args.rounds):  # alternate, so both see the same machine load
        broadcast.append(timed(lambda: ex.execute(batch), args.steps))
        ray.get(ex.workers[0].stop.remote())  # free ranks 1.. from their loops
        ray.wait(ex._loops, num_returns=len(ex._loops))
        fanned.append(timed(fan_out, args.steps))
        ex._loops = [w.serve.remote() for w in ex.workers[1:]]
    broadcast, fanned = min(broadcast), min(fanned)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"tp={args.tp} batch={args.batch} context={args.context} ({card}): "
          f"broadcast {broadcast:.2f} ms/step, fan-out {fanned:.2f} ms/step")
    ex._dead = "benchmark over"
    ex.shutdown()


if __name__ == "__main__":
    main()
