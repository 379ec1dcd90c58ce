"""Perplexity through tpserve's own engine, so a workspace's quantization
(AWQ weights, int8 KV cache) is what gets measured."""
from __future__ import annotations

import math

import torch

from .forward_batch import ForwardBatch
from .llm import LLM


def engine_perplexity(model: str | None, dataset: str | None, seqlen: int, samples: int,
                      quant_policy: int = 0, device: str = "auto") -> float:
    """exp(mean next-token NLL) over up to `samples` consecutive `seqlen` windows of
    the dataset (default: the bundled model's held-out text)."""
    from ..quant.datasets import load_calib_texts
    from ..quant.ppl import perplexity, sequential_windows
    from .demo_model import demo_heldout_text

    block = 64
    blocks = math.ceil(seqlen / block) + 1
    llm = LLM(model, quant_policy=quant_policy, device=device, session_len=seqlen + 1,
              cache_block_seq_len=block, cache_max_entry_count=blocks, max_batch_size=1,
              max_prefill_tokens=max(seqlen, 8192))
    texts = [demo_heldout_text()] if dataset is None else load_calib_texts(dataset)
    ids = torch.tensor(llm.encode("\n\n".join(texts)))
    windows = sequential_windows(ids, seqlen, samples)

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        tokens = window[0].tolist()
        batch = ForwardBatch.build([tokens], [0], [list(range(blocks))], block)
        batch.logits_indices = torch.arange(len(tokens))
        return llm.executor.execute(batch).float().cpu()[None]

    try:
        return perplexity(logits_fn, windows)
    finally:
        llm.shutdown()
