"""Running a Hugging Face decoder one layer at a time over a batch of token windows.

The offline jobs keep the model on the CPU and move one decoder layer at a
time to the device, so a model larger than the device can be processed:
``first_layer_inputs`` captures what enters layer 0, ``layer_forward``
pushes those hidden states through one layer.
"""

import contextlib

import torch
from torch import Tensor, nn

from tpserve.quant import hf_model

BATCH_TOKENS = 16384  # tokens per layer forward call


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: Tensor, dev: torch.device) -> tuple[Tensor, dict]:
    """Hidden states entering layer 0 (``[n, seqlen, hidden]``) and the keyword args it receives."""
    base, layers = model.model, hf_model.decoder_layers(model)
    hidden, layer_kwargs = [], {}

    def grab(_m, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    base.embed_tokens.to(dev)
    base.rotary_emb.to(dev)
    try:
        for ids in windows:
            with contextlib.suppress(_StopForward):
                base(input_ids=ids[None].to(dev), use_cache=False)
    finally:
        handle.remove()
        base.embed_tokens.cpu()
        base.rotary_emb.cpu()
    return torch.cat(hidden), layer_kwargs


@torch.no_grad()
def layer_forward(layer: nn.Module, inps: Tensor, kwargs: dict) -> Tensor:
    """The layer applied to every window; the kwargs (batch 1) broadcast over the batch."""
    outs = torch.empty_like(inps)
    batch = max(1, BATCH_TOKENS // inps.shape[1])
    for b in range(0, inps.shape[0], batch):
        out = layer(inps[b:b + batch], **kwargs)
        outs[b:b + batch] = out[0] if isinstance(out, tuple) else out
    return outs
