"""Tiny random-weight checkpoints of every supported family, written as a
user would have them on disk, each with the transformers model that is its
reference. Families transformers has only as remote code (InternLM v1/v2,
Qwen v1) are built by renaming/packing an equivalent built-in model."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20 +
          "Hello world! tpserve serves models on Ray. 你好，世界。 😀 emoji test. " * 20)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, rms_norm_eps=1e-6)
VOCAB = 301  # deliberately not a multiple of 64 * tp: exercises vocab padding


def byte_bpe_tokenizer(folder: Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def _save(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


def _hf(model, folder: Path):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    byte_bpe_tokenizer(folder)
    return model.eval()


def _init(model):
    # larger-than-default weights so logits differ clearly between tokens
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def make_llama(folder: Path, **over):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                      **{**SHAPE, **over})
    return _hf(_init(LlamaForCausalLM(cfg)), folder)


def make_mistral(folder: Path):
    torch.manual_seed(2)
    cfg = MistralConfig(vocab_size=VOCAB, num_key_value_heads=2, sliding_window=None,
                        bos_token_id=0, eos_token_id=1, **SHAPE)
    return _hf(_init(MistralForCausalLM(cfg)), folder)


def make_qwen2(folder: Path):
    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                      **SHAPE)
    return _hf(_init(Qwen2ForCausalLM(cfg)), folder)


def make_qwen3(folder: Path):
    torch.manual_seed(4)
    cfg = Qwen3Config(vocab_size=VOCAB, num_key_value_heads=2, head_dim=16, bos_token_id=0,
                      eos_token_id=1, **SHAPE)
    return _hf(_init(Qwen3ForCausalLM(cfg)), folder)


def make_internlm(folder: Path):
    """InternLM v1 = Llama names with biases on q/k/v/o."""
    torch.manual_seed(5)
    ref = _init(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attention_bias=True,
                                             bos_token_id=0, eos_token_id=1, **SHAPE))).eval()
    cfg = dict(SHAPE, architectures=["InternLMForCausalLM"], model_type="internlm", bias=True,
               vocab_size=VOCAB, hidden_act="silu", bos_token_id=0, eos_token_id=1,
               rotary={"base": 10000, "type": "dynamic"}, torch_dtype="float32")
    _save(folder, cfg, ref.state_dict())
    byte_bpe_tokenizer(folder)
    return ref


def make_internlm2(folder: Path):
    """InternLM2: q/k/v packed per kv-head group in `wqkv`, its own module names."""
    torch.manual_seed(6)
    ref = _init(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2,
                                             bos_token_id=0, eos_token_id=1, **SHAPE))).eval()
    sd, hd, kv = ref.state_dict(), 16, 2
    group = SHAPE["num_attention_heads"] // kv
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(kv, group, hd, -1)
        k = sd[p + "self_attn.k_proj.weight"].reshape(kv, 1, hd, -1)
        v = sd[p + "self_attn.v_proj.weight"].reshape(kv, 1, hd, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, 64)
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    cfg = dict(SHAPE, architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
               num_key_value_heads=kv, vocab_size=VOCAB, rope_theta=10000, bos_token_id=0,
               eos_token_id=1, torch_dtype="float32")
    _save(folder, cfg, out)
    byte_bpe_tokenizer(folder)
    return ref


def qwen_tiktoken_file(folder: Path) -> int:
    """A byte-level qwen.tiktoken (256 single-byte tokens); returns its size."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (folder / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    return 256


def make_qwen(folder: Path):
    """Qwen v1: packed `c_attn` with bias, `w1/w2/c_proj` MLP, tiktoken tokenizer."""
    torch.manual_seed(7)
    vocab = 256 + 208 + 16  # bytes, Qwen's special tokens, spare rows
    ref = _init(Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=4,
                                             **SHAPE))).eval()
    sd = ref.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(SHAPE["num_hidden_layers"]):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[h + f"attn.c_attn.{kind}"] = torch.cat(
                [sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[h + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[h + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[h + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[h + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    cfg = dict(architectures=["QWenLMHeadModel"], model_type="qwen", vocab_size=vocab,
               hidden_size=64, intermediate_size=2 * 128, num_hidden_layers=2,
               num_attention_heads=4, kv_channels=16, layer_norm_epsilon=1e-6,
               rotary_emb_base=10000, rotary_pct=1.0, seq_length=512, no_bias=True,
               fp32=True, eos_token_id=256)
    _save(folder, cfg, out)
    qwen_tiktoken_file(folder)
    return ref


FAMILY_BUILDERS = {
    "llama": make_llama, "mistral": make_mistral, "qwen2": make_qwen2, "qwen3": make_qwen3,
    "internlm": make_internlm, "internlm2": make_internlm2, "qwen": make_qwen,
}
