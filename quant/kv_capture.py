"""Seeing each layer's keys and values exactly as the KV cache would store them.

Keys are taken after rotary embedding (and after Qwen3's per-head k_norm), at
the point where a transformers model hands them to its attention function.
LMDeploy 0.1.0 took the ``k_proj`` output instead; rotary embedding mixes
pairs of head dimensions, so pre-rotary ranges can understate the cached
keys' range by up to sqrt(2) and their midpoint (the asymmetric zero point)
does not carry over. Values are the ``v_proj`` output either way.

The recorder is an attention implementation registered with transformers
under ``KV_RECORDER``: it passes each layer's ``key``/``value``
(``[batch, kv_heads, seq, head_dim]``) to a callback set on the attention
module, then runs SDPA attention.
"""

import contextlib
from typing import Callable

from torch import Tensor, nn

KV_RECORDER = "tpserve_kv_recorder"
_CALLBACK_ATTR = "_tpserve_kv_callback"


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    callback = getattr(module, _CALLBACK_ATTR, None)
    if callback is not None:
        callback(module.layer_idx, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KV_RECORDER, _recording_attention)
    AttentionMaskInterface.register(KV_RECORDER, sdpa_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


@contextlib.contextmanager
def record_kv(model: nn.Module, callback: Callable[[int, Tensor, Tensor], None]):
    """Within the block, ``callback(layer_idx, key, value)`` sees every layer's K/V."""
    _register()
    previous = model.config._attn_implementation
    attns = _attention_modules(model)
    for attn in attns:
        setattr(attn, _CALLBACK_ATTR, callback)
    model.set_attn_implementation(KV_RECORDER)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for attn in attns:
            delattr(attn, _CALLBACK_ATTR)


def per_head_rows(x: Tensor) -> Tensor:
    """``[batch, kv_heads, seq, head_dim]`` -> ``[batch * seq, kv_heads, head_dim]``."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)
