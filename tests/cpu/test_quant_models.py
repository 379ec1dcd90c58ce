"""Tiny Hugging Face models and calibration text for the quantization tests (imported by them)."""

import random

import torch

VOCAB = 256  # one token per byte


def make_tiny(path, family="llama", outliers=False, **overrides):
    """A random 2-layer model (hidden 64) with a byte-level tokenizer, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    torch.manual_seed(0)
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**{**base, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    if outliers:  # a few input channels of the qkv and gate/up groups much larger than the rest
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 17, 40]] = 25.0
                layer.post_attention_layernorm.weight[[5, 50]] = 25.0
    model.save_pretrained(path)
    return str(path)


def write_calib_text(path, lines=40, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)))
    return str(path)


def test_tiny_models_tokenize_and_run(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for family in ("llama", "qwen2"):
        path = make_tiny(tmp_path / family, family=family, num_key_value_heads=2)
        ids = AutoTokenizer.from_pretrained(path)("hello world", add_special_tokens=False)["input_ids"]
        assert len(ids) == len("hello world")
        logits = AutoModelForCausalLM.from_pretrained(path)(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), VOCAB)
