"""Engine-level equality scenarios shared by the CPU tests (tiny models) and the
GPU tests (real widths): greedy tokens of the serving engine equal those of
transformers' `generate` for mixed-length prompts that share prefixes, and
stay equal with prefix-cache hits, chunked prefill, and preemption."""
from __future__ import annotations

import torch

from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.llm import LLM
from tpserve.engine.sampling_params import SamplingParams


def runner_greedy(runner, prompts: list[list[int]], steps: int
                  ) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill logits (float32, CPU) and `steps` greedy tokens per prompt, driving a runner
    (a ModelRunner or a tensor-parallel executor) with ForwardBatches directly."""
    bs = runner.block_size
    per_seq = -(-(max(map(len, prompts)) + steps) // bs)
    tables = [[b * per_seq + i for i in range(per_seq)] for b in range(len(prompts))]
    logits = runner.execute(ForwardBatch.build(prompts, [0] * len(prompts), tables, bs))
    prefill, tokens = logits.float().cpu().clone(), [[] for _ in prompts]
    for step in range(steps):
        nxt = logits.argmax(-1).tolist()
        for out, t in zip(tokens, nxt):
            out.append(t)
        context = [len(p) + step for p in prompts]
        logits = runner.execute(ForwardBatch.build([[t] for t in nxt], context, tables, bs))
    return prefill, tokens


def shared_prefix_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Five prompts of 3..70 tokens; three share a 40-token prefix, two share 17."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    long_prefix, short_prefix = ids(40), ids(17)
    return [long_prefix + ids(30), long_prefix + ids(5), long_prefix[:33],
            short_prefix + ids(11), ids(3)]


def reference_tokens(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def check_scenarios(workspace, reference_model, options: dict, block_size: int,
                    max_tokens: int = 24, vocab: int | None = None) -> dict[str, int]:
    """Runs every scenario; returns the engine counters that prove each one happened."""
    vocab = vocab or reference_model.config.vocab_size
    prompts = shared_prefix_prompts(vocab)
    want = reference_tokens(reference_model, prompts, max_tokens)
    base = dict(options, cache_block_seq_len=block_size)

    llm = LLM(workspace, **base)
    try:
        assert greedy(llm, prompts, max_tokens) == want, "mixed-length batch differs"
        before = llm.engine.stats().prefix_cache_hits
        assert greedy(llm, prompts, max_tokens) == want, "second run (prefix-cache hits) differs"
        hits = llm.engine.stats().prefix_cache_hits - before
        assert hits > 0, "the second run found nothing in the prefix cache"
    finally:
        llm.shutdown()

    llm = LLM(workspace, **dict(base, max_prefill_tokens=block_size))
    try:
        assert greedy(llm, prompts, max_tokens) == want, "chunked prefill differs"
    finally:
        llm.shutdown()

    longest = max(len(p) for p in prompts) + max_tokens
    blocks = -(-longest // block_size) + 2  # room for one sequence and a bit
    llm = LLM(workspace, **dict(base, cache_max_entry_count=blocks, enable_prefix_caching=False))
    try:
        assert greedy(llm, prompts, max_tokens) == want, "run with preemptions differs"
        preemptions = llm.engine.stats().num_preemptions
        assert preemptions > 0, "the small cache forced no preemption"
    finally:
        llm.shutdown()
    return {"prefix_hits": hits, "preemptions": preemptions}
