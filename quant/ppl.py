"""Perplexity on token windows, for checking what quantization costs.

``perplexity`` works with any model through a ``logits_fn(ids [1, L]) ->
logits [1, L, V]``; ``hf_perplexity`` is the float baseline of a Hugging Face
model on consecutive windows of a text (the usual WikiText-2 protocol: the
texts joined by blank lines, cut into non-overlapping ``seqlen`` windows).
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tpserve.engine.errors import ConfigError
from tpserve.quant import hf_model


@torch.no_grad()
def perplexity(logits_fn: Callable[[Tensor], Tensor], token_windows: Tensor) -> float:
    """exp(mean next-token negative log-likelihood) over all windows ``[n, L]``."""
    if token_windows.dim() != 2 or token_windows.shape[1] < 2:
        raise ValueError(f"token_windows must be [n, L] with L >= 2, got {tuple(token_windows.shape)}")
    nll, count = 0.0, 0
    for ids in token_windows:
        logits = logits_fn(ids[None])[0, :-1].float()
        nll += F.cross_entropy(logits, ids[1:].to(logits.device), reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(nll / count)


def sequential_windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Consecutive non-overlapping ``[n, seqlen]`` windows of a 1-D token tensor (tail dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def hf_perplexity(
    model_path: str, texts: list[str], seqlen: int, samples: int | None = None, device: str = "auto"
) -> float:
    """Float perplexity of a Hugging Face model on at most ``samples`` windows of ``texts``."""
    dev = hf_model.resolve_device(device)
    config = hf_model.read_hf_config(model_path)
    model = hf_model.load_causal_lm(model_path, hf_model.compute_dtype(config, dev)).to(dev)
    tokenizer = hf_model.load_tokenizer(model_path)
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    windows = sequential_windows(ids, seqlen, samples)
    return perplexity(lambda x: model(input_ids=x.to(dev), use_cache=False).logits, windows)
