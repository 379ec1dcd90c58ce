"""Frozen configuration records shared by the converter, the loader and the engine.

`ModelConfig` describes the network's shape in one vocabulary for every
supported family; `EngineConfig` holds the runtime knobs (LMDeploy's names).
Both are validated once, when built, with errors that name the option.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, independent of its source family."""

    architecture: str  # the Hugging Face architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    # transformers' rope_parameters minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


@dataclass(frozen=True)
class QuantConfig:
    """How a workspace's linear weights are stored. method "none" = plain floats."""

    method: str = "none"  # "none" | "awq"
    bits: int = 16
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("none", "awq"):
            raise ConfigError(f"weight quantization method must be 'none' or 'awq', got {self.method!r}")
        if self.method == "awq" and (self.bits != 4 or self.group_size <= 0):
            raise ConfigError(f"awq weights need bits=4 and a positive group size, got "
                              f"bits={self.bits} group_size={self.group_size}")


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs, spelled as in LMDeploy's config.ini where it has them.

    cache_max_entry_count: a fraction of the free device memory (after weights)
    given to KV blocks when < 1; a number of blocks when >= 1.
    quant_policy: 0 = KV cache in the compute dtype; 8 = int8 KV cache
    (LMDeploy 0.1.0's quant_policy=4 means the same and is accepted).
    """

    session_len: int = 4096
    max_batch_size: int = 64
    max_prefill_tokens: int = 8192
    cache_max_entry_count: float = 0.5
    cache_block_seq_len: int = 64
    quant_policy: int = 0
    enable_prefix_caching: bool = True
    eager_mode: bool = False  # True: no CUDA graphs (slower; for debugging)
    # schedule step t+1 while step t runs (llm_engine.py); False: one step at a time
    async_scheduling: bool = True
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.session_len <= 0:
            raise ConfigError(f"--session-len must be positive, got {self.session_len}")
        if self.max_batch_size <= 0:
            raise ConfigError(f"--max-batch-size must be positive, got {self.max_batch_size}")
        if self.max_prefill_tokens <= 0:
            raise ConfigError(f"--max-prefill-tokens must be positive, got {self.max_prefill_tokens}")
        if self.cache_max_entry_count <= 0:
            raise ConfigError("--cache-max-entry-count must be > 0 (a fraction of free memory "
                              f"below 1, a number of blocks from 1), got {self.cache_max_entry_count}")
        if self.cache_block_seq_len <= 0 or self.cache_block_seq_len & (self.cache_block_seq_len - 1):
            raise ConfigError("--cache-block-seq-len must be a power of two, "
                              f"got {self.cache_block_seq_len}")
        if self.quant_policy not in (0, 4, 8):
            raise ConfigError(f"--quant-policy must be 0 (no KV quantization) or 8 (int8 KV; "
                              f"LMDeploy's 4 is accepted as 8), got {self.quant_policy}")
        for name in ("enable_prefix_caching", "eager_mode", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"--{name.replace('_', '-')} must be true or false, "
                                  f"got {getattr(self, name)!r}")
        if self.dtype not in ("auto",) + DTYPES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")

    @property
    def kv_int8(self) -> bool:
        return self.quant_policy in (4, 8)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**options)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class WorkspaceMeta:
    """What `tpserve_config.json` in a workspace records."""

    model: ModelConfig
    model_name: str  # chat template name
    tp: int
    weight_type: str  # float32 | bfloat16 | float16 | int4
    quant: QuantConfig = field(default_factory=QuantConfig)
    padded_vocab_size: int = 0
    tokenizer_kind: str = "hf"  # "hf" | "qwen_tiktoken"
    engine_defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""
