"""The held-out check of `lite auto_awq`: float vs 4-bit perplexity on text kept out of calibration.

``split_heldout`` keeps the last documents of the calibration texts (a tenth,
at most ``HOLDOUT_MAX_DOCS``) out of calibration, always, so the checkpoint
does not depend on whether the check runs. ``heldout_perplexity`` then runs
consecutive windows of those documents through the float model and through
the same model with each layer's checkpoint tensors (dequantized) loaded,
one decoder layer on the device at a time, as the quantization itself does:
a model larger than the device still fits.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tpserve.quant import hf_model
from tpserve.quant.layer_stream import first_layer_inputs, layer_forward
from tpserve.quant.quantize import dequantize_awq

HOLDOUT_FRACTION = 10  # one document in ten
HOLDOUT_MAX_DOCS = 1000
EVAL_WINDOWS = 16
EVAL_MAX_SEQLEN = 2048


@dataclass(frozen=True)
class HeldoutResult:
    windows: int
    seqlen: int
    fp: float
    quantized: float

    def line(self, bits: int) -> str:
        return (f"perplexity on {self.windows} held-out windows of {self.seqlen} tokens: "
                f"fp {self.fp:.2f} -> w{bits} {self.quantized:.2f}")


def split_heldout(texts: list[str]) -> tuple[list[str], list[str]]:
    """``(calibration, held out)``: the last tenth of the documents (none when there is one)."""
    n = min(len(texts) // HOLDOUT_FRACTION or (1 if len(texts) > 1 else 0), HOLDOUT_MAX_DOCS)
    return texts[:len(texts) - n], texts[len(texts) - n:]


def heldout_windows(texts: list[str], tokenizer, seqlen: int, max_windows: int = EVAL_WINDOWS) -> Tensor | None:
    """Up to ``max_windows`` consecutive ``[n, seqlen]`` windows of the texts joined by blank
    lines; None when they hold fewer than ``seqlen`` tokens."""
    seqlen = min(seqlen, EVAL_MAX_SEQLEN)
    needed, chunks, total = max_windows * seqlen, [], 0
    for text in texts:
        ids = tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= needed:
            break
    n = min(total // seqlen, max_windows)
    if n == 0:
        return None
    return torch.cat(chunks)[: n * seqlen].reshape(n, seqlen)


def dequantized_layer_state(path: Path, prefix: str) -> dict[str, Tensor]:
    """One layer's checkpoint tensors as a float state dict relative to the layer."""
    tensors = load_file(str(path))
    state = {}
    for key, t in tensors.items():
        rel = key.removeprefix(prefix + ".")
        if key.endswith(".qweight"):
            stem = key.removesuffix(".qweight")
            weight = dequantize_awq(t, tensors[f"{stem}.qzeros"], tensors[f"{stem}.scales"])
            state[rel.removesuffix(".qweight") + ".weight"] = weight
        elif not key.endswith((".qzeros", ".scales")):
            state[rel] = t.float()
    return state


@torch.no_grad()
def _window_nll(model: nn.Module, hidden: Tensor, windows: Tensor, dev: torch.device) -> float:
    norm, head = model.model.norm.to(dev), model.lm_head.to(dev)
    nll = 0.0
    for h, ids in zip(hidden, windows):
        logits = head(norm(h[None]))[0, :-1].float()
        nll += F.cross_entropy(logits, ids[1:].to(dev), reduction="sum").item()
    norm.cpu()
    head.cpu()
    return nll / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def _stream(model: nn.Module, windows: Tensor, dev: torch.device, layer_files: list[Path] | None) -> float:
    hidden, kwargs = first_layer_inputs(model, windows, dev)
    for i, layer in enumerate(hf_model.decoder_layers(model)):
        if layer_files is not None:
            layer.load_state_dict(dequantized_layer_state(layer_files[i], f"model.layers.{i}"))
        hidden = layer_forward(layer.to(dev), hidden, kwargs)
        layer.cpu()
    return math.exp(_window_nll(model, hidden, windows, dev))


def heldout_perplexity(model_path: str, layer_files: list[Path], windows: Tensor, device: torch.device) -> HeldoutResult:
    """Float and quantized perplexity of the model on ``windows``; the quantized pass loads the
    layer files into a fresh float model (the float one is not kept)."""
    model = hf_model.load_causal_lm(model_path, hf_model.compute_dtype(hf_model.read_hf_config(model_path), device))
    fp = _stream(model, windows, device, None)
    quantized = _stream(model, windows, device, layer_files)
    return HeldoutResult(windows.shape[0], windows.shape[1], fp, quantized)
