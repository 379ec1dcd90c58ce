"""AWQ on one Hugging Face decoder layer: capture its inputs, search, fold scales, clip, quantize.

Names are relative to the layer (``self_attn.q_proj``). The linears are
grouped by the input they share; a ``ScalePair`` ties such a group to the op
whose output feeds it, which absorbs ``1 / s``.
"""

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from tpserve.quant.awq_blocks import ModuleBlock
from tpserve.quant.awq_search import apply_clip, find_clip, find_scales
from tpserve.quant.hf_model import layer_linears
from tpserve.quant.observers import ChannelStats
from tpserve.quant.pack import pack_awq
from tpserve.quant.quantize import quantize_groupwise

INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# q/k feed a softmax through q k^T: their output error says little, as in AWQ.
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")

logger = logging.getLogger(__name__)
Mapper = Callable[[Callable, list[tuple]], list]


@dataclass(frozen=True)
class AwqSettings:
    bits: int = 4
    group_size: int = 128
    search_scale: bool = True
    clip: bool = False


@dataclass(frozen=True)
class ScalePair:
    prev: str  # a norm, or a linear whose output rows absorb 1/s
    linears: tuple[str, ...]


@dataclass(frozen=True)
class InputFeatures:
    """One linear group's input over the calibration tokens."""

    sample: Tensor  # [tokens sampled, C] float32, for the searches
    absmean: Tensor  # [C] over all tokens
    absmax: Tensor  # [C] over all tokens


def scale_pairs(layer: nn.Module) -> list[ScalePair]:
    """input_layernorm -> qkv; v -> o when v's output is o's input; post norm -> gate/up; up -> down."""
    v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    pairs = [ScalePair("input_layernorm", INPUT_GROUPS[0])]
    if v.weight.shape == o.weight.shape:  # multi-head attention; GQA repeats v heads
        pairs.append(ScalePair("self_attn.v_proj", INPUT_GROUPS[1]))
    pairs += [ScalePair("post_attention_layernorm", INPUT_GROUPS[2]), ScalePair("mlp.up_proj", INPUT_GROUPS[3])]
    return pairs


class FeatureRecorder:
    """Forward hooks on the first linear of each input group: stats over all tokens, a token sample."""

    def __init__(self, layer: nn.Module, positions: Tensor):
        self.positions = positions
        self.stats = {group[0]: ChannelStats() for group in INPUT_GROUPS}
        self.samples = {group[0]: [] for group in INPUT_GROUPS}
        self.handles = [
            layer.get_submodule(group[0]).register_forward_hook(self._hook(group[0])) for group in INPUT_GROUPS
        ]

    def _hook(self, name: str):
        def record(_m, args, _out):
            x = args[0].detach()
            self.stats[name].update(x)
            picked = x[:, self.positions.to(x.device)].reshape(-1, x.shape[-1]).float()
            self.samples[name].append(picked)

        return record

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self) -> dict[str, InputFeatures]:
        """Remove the hooks; the features of every linear (group members share theirs)."""
        self.remove()
        feats = {}
        for group in INPUT_GROUPS:
            name = group[0]
            f = InputFeatures(torch.cat(self.samples[name]), self.stats[name].absmean, self.stats[name].absmax)
            feats.update({member: f for member in group})
        return feats


def _fold(layer: nn.Module, pair: ScalePair, s: Tensor) -> None:
    prev = layer.get_submodule(pair.prev)
    s_prev = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s_prev.view(-1, 1).to(prev.weight.dtype))
    else:
        prev.weight.div_(s_prev.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s_prev.to(prev.bias.dtype))
    for name in pair.linears:
        w = layer.get_submodule(name).weight
        w.mul_(s.to(device=w.device, dtype=w.dtype).view(1, -1))


def local_map(fn: Callable, arg_lists: list[tuple]) -> list:
    return [fn(*args) for args in arg_lists]


def search_block(layer: nn.Module, pair: ScalePair, feats: dict[str, InputFeatures],
                 attention_inputs: tuple[Tensor, dict] | None) -> ModuleBlock | None:
    """The block whose output judges ``pair``'s scales: the attention block for q/k/v (over
    whole windows ``attention_inputs = (layer input hidden states, layer kwargs)``), the
    MLP for gate/up; None (the linears' own outputs) for the others."""
    if pair.prev == "input_layernorm" and attention_inputs is not None:
        hidden, kwargs = attention_inputs
        names = tuple(n.removeprefix("self_attn.") for n in pair.linears)
        normed = layer.input_layernorm(hidden)
        return ModuleBlock(layer.self_attn, names, (), {**kwargs, "hidden_states": normed})
    if pair.prev == "post_attention_layernorm":
        x = feats[pair.linears[0]].sample
        names = tuple(n.removeprefix("mlp.") for n in pair.linears)
        return ModuleBlock(layer.mlp, names, (x.to(layer.mlp.gate_proj.weight.dtype),), {})
    return None


@torch.no_grad()
def quantize_layer(
    layer: nn.Module,
    feats: dict[str, InputFeatures],
    prefix: str,
    settings: AwqSettings,
    out_dtype: torch.dtype,
    mapper: Mapper = local_map,
    attention_inputs: tuple[Tensor, dict] | None = None,
) -> dict[str, Tensor]:
    """Search and fold scales (and clip), then return the layer's checkpoint tensors (on CPU).

    ``mapper(fn, arg_lists)`` runs the independent searches (in order, or as Ray tasks).
    ``attention_inputs``: whole windows entering the layer and its kwargs, so that q/k/v
    are judged by the attention output; without them, by their own outputs.
    """
    pairs = scale_pairs(layer)
    bits, gs = settings.bits, settings.group_size
    stat = "absmean" if settings.search_scale else "absmax"
    jobs = [
        (feats[p.linears[0]].sample, getattr(feats[p.linears[0]], stat),
         [layer.get_submodule(n).weight for n in p.linears], bits, gs, settings.search_scale,
         search_block(layer, p, feats, attention_inputs))
        for p in pairs
    ]
    input_scale = {}
    for pair, found in zip(pairs, mapper(find_scales, jobs)):
        logger.debug("%s %s: ratio %s, block output mse %.4g (round-to-nearest %.4g)",
                     prefix, pair.prev, found.ratio, found.loss, found.rtn_loss)
        _fold(layer, pair, found.scales)
        input_scale.update({n: found.scales for n in pair.linears})
    if settings.clip:
        _clip_layer(layer, feats, input_scale, settings, mapper)
    return layer_tensors(layer, prefix, settings, out_dtype)


def _clip_layer(layer, feats, input_scale, settings: AwqSettings, mapper: Mapper) -> None:
    names = [n for group in INPUT_GROUPS for n in group if n not in NO_CLIP]
    jobs = []
    for n in names:
        x = feats[n].sample
        if n in input_scale:  # the op before now divides by s
            x = x / input_scale[n].to(x.device)
        jobs.append((layer.get_submodule(n).weight, x, settings.bits, settings.group_size))
    for n, bound in zip(names, mapper(find_clip, jobs)):
        w = layer.get_submodule(n).weight
        w.copy_(apply_clip(w, bound.to(w.device)))


def layer_tensors(layer: nn.Module, prefix: str, settings: AwqSettings, out_dtype: torch.dtype) -> dict[str, Tensor]:
    """Checkpoint tensors: ``qweight/qzeros/scales`` per linear, everything else cast to ``out_dtype``."""
    linears = layer_linears(layer)
    tensors = {}
    for name, t in layer.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight":
            key = f"{prefix}.{module}"
            intweight, scales, zeros = quantize_groupwise(t, settings.bits, settings.group_size)
            qweight, qzeros = pack_awq(intweight, zeros)
            tensors[f"{key}.qweight"] = qweight.cpu()
            tensors[f"{key}.qzeros"] = qzeros.cpu()
            tensors[f"{key}.scales"] = scales.to(torch.float16).cpu()
        else:
            tensors[f"{prefix}.{name}"] = t.to(out_dtype).cpu().contiguous()
    return tensors


def sample_positions(seqlen: int, n_windows: int, max_tokens: int, seed: int = 0) -> Tensor:
    """Token positions sampled in every window so that about ``max_tokens`` rows feed the searches."""
    per_window = min(seqlen, max(1, math.ceil(max_tokens / n_windows)))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(seqlen, generator=gen)[:per_window].sort().values
