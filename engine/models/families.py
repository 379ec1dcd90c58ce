"""The supported model families: how each reads its config.json and names its weights.

Every family is mapped onto one vocabulary (Llama's, without the `model.`
prefix): `embed_tokens.weight`, `norm.weight`, `lm_head.weight` and per layer
`layers.{i}.input_layernorm.weight`, `layers.{i}.self_attn.{q,k,v,o}_proj.*`,
`layers.{i}.self_attn.{q,k}_norm.weight`, `layers.{i}.post_attention_layernorm.weight`,
`layers.{i}.mlp.{gate,up,down}_proj.*`. A family is a config parser plus a
function that turns one HF tensor into zero or more canonical tensors, so the
converter, the tensor-parallel split and the decoder never see family names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError

Tensors = Iterator[tuple[str, torch.Tensor]]


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from transformers 4 or 5 style configs."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    params.update(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _llama_like(cfg: dict[str, Any], **overrides: Any) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    fields = dict(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        source_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _strip_model_prefix(name: str, tensor: torch.Tensor) -> Tensors:
    yield name.removeprefix("model."), tensor


# --- family-specific config parsers and weight renamers -------------------------------

def _mistral_config(cfg: dict[str, Any]) -> ModelConfig:
    return _llama_like(cfg, sliding_window=cfg.get("sliding_window"))


def _qwen2_config(cfg: dict[str, Any]) -> ModelConfig:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, qkv_bias=True, o_bias=False, sliding_window=window)


def _qwen3_config(cfg: dict[str, Any]) -> ModelConfig:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, qk_norm=True, sliding_window=window)


def _internlm_config(cfg: dict[str, Any]) -> ModelConfig:
    rotary = cfg.get("rotary") or {}
    cfg = dict(cfg, rope_theta=rotary.get("base", cfg.get("rope_theta", 10000.0)))
    bias = bool(cfg.get("bias", True))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias)


def _internlm2_config(cfg: dict[str, Any]) -> ModelConfig:
    bias = bool(cfg.get("bias", False))
    return _llama_like(cfg, qkv_bias=bias, o_bias=bias)


def _internlm2_weights(cfg: ModelConfig) -> Callable[[str, torch.Tensor], Tensors]:
    renames = {
        "model.tok_embeddings.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
    }
    layer_renames = {
        "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    }
    group = cfg.num_heads // cfg.num_kv_heads

    def convert(name: str, tensor: torch.Tensor) -> Tensors:
        if name in renames:
            yield renames[name], tensor
            return
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m:
            raise ModelFormatError(f"unexpected InternLM2 tensor {name!r}")
        i, module, kind = m.groups()
        if module == "attention.wqkv":
            # rows are grouped per kv head: [q * group, k, v] x head_dim
            rest = tensor.shape[1:]
            t = tensor.reshape(cfg.num_kv_heads, group + 2, cfg.head_dim, *rest)
            q = t[:, :group].reshape(cfg.q_size, *rest)
            k = t[:, group].reshape(cfg.kv_size, *rest)
            v = t[:, group + 1].reshape(cfg.kv_size, *rest)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"layers.{i}.self_attn.{proj}.{kind}", part.contiguous()
            return
        if module not in layer_renames:
            raise ModelFormatError(f"unexpected InternLM2 tensor {name!r}")
        yield f"layers.{i}.{layer_renames[module]}.{kind}", tensor

    return convert


def _qwen_config(cfg: dict[str, Any]) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    return ModelConfig(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"] // 2,  # Qwen v1 stores 2x the MLP width
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=cfg.get("kv_channels") or hidden // heads,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        max_position_embeddings=cfg.get("seq_length", cfg.get("max_position_embeddings", 8192)),
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
        qkv_bias=True,
        o_bias=not cfg.get("no_bias", True),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=None,
        eos_token_ids=_eos_ids(cfg) or (151643,),
        source_dtype="bfloat16" if cfg.get("bf16") else ("float16" if cfg.get("fp16") else "float32"),
    )


def _qwen_weights(cfg: ModelConfig) -> Callable[[str, torch.Tensor], Tensors]:
    renames = {"transformer.wte.weight": "embed_tokens.weight",
               "transformer.ln_f.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
    layer_renames = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                     "attn.c_proj": "self_attn.o_proj", "mlp.w2": "mlp.gate_proj",
                     "mlp.w1": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}

    def convert(name: str, tensor: torch.Tensor) -> Tensors:
        if name in renames:
            yield renames[name], tensor
            return
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m:
            raise ModelFormatError(f"unexpected Qwen tensor {name!r}")
        i, module, kind = m.groups()
        if module == "attn.c_attn":  # [q; k; v] stacked on the output dim
            q, k, v = tensor.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"layers.{i}.self_attn.{proj}.{kind}", part.contiguous()
            return
        if module not in layer_renames:
            raise ModelFormatError(f"unexpected Qwen tensor {name!r}")
        yield f"layers.{i}.{layer_renames[module]}.{kind}", tensor

    return convert


@dataclass(frozen=True)
class Family:
    name: str
    parse_config: Callable[[dict[str, Any]], ModelConfig]
    # builds the per-tensor renamer for one model (some need the parsed shape)
    weight_converter: Callable[[ModelConfig], Callable[[str, torch.Tensor], Tensors]]
    tokenizer_kind: str = "hf"
    default_template: str = "base"
    supports_awq: bool = True


def _plain(_: ModelConfig) -> Callable[[str, torch.Tensor], Tensors]:
    return _strip_model_prefix


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", _llama_like, _plain, default_template="llama2"),
    "MistralForCausalLM": Family("mistral", _mistral_config, _plain, default_template="base"),
    "Qwen2ForCausalLM": Family("qwen2", _qwen2_config, _plain, default_template="qwen-7b"),
    "Qwen3ForCausalLM": Family("qwen3", _qwen3_config, _plain, default_template="qwen-7b"),
    "InternLMForCausalLM": Family("internlm", _internlm_config, _plain,
                                  default_template="internlm-chat-7b"),
    "InternLM2ForCausalLM": Family("internlm2", _internlm2_config, _internlm2_weights,
                                   default_template="internlm2-chat-7b", supports_awq=False),
    "QWenLMHeadModel": Family("qwen", _qwen_config, _qwen_weights, tokenizer_kind="qwen_tiktoken",
                              default_template="qwen-7b", supports_awq=False),
}


def family_for(hf_config: dict[str, Any]) -> Family:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    found = ", ".join(archs) if archs else "none (config.json has no 'architectures')"
    raise ModelFormatError(
        f"unsupported architecture {found}; tpserve supports {', '.join(FAMILIES)}")
