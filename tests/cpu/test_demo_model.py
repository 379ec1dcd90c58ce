"""The bundled demo model loads with transformers, predicts held-out text far better
than chance, and its tokenizer and chat template behave as the engine expects."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tpserve.engine.demo_model import demo_heldout_text, demo_model_path

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": 'What does "hacker" mean?'},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def model():
    m = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    return m.eval()


def test_folder_is_small_and_complete():
    folder = demo_model_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "heldout.txt", "README.md"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) < 26 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # exercises GQA
    assert 50_000 < len(demo_heldout_text()) < 400_000


def test_heldout_perplexity_far_below_chance(model, tokenizer):
    ids = tokenizer(demo_heldout_text()[:20_000], return_tensors="pt", verbose=False).input_ids[0, :2049]
    assert len(ids) == 2049
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 512):
            chunk = ids[start: start + 513].unsqueeze(0)
            logits = model(chunk[:, :-1]).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    ppl = math.exp(nll / count)
    print(f"demo model held-out perplexity over {count} tokens: {ppl:.2f}")
    # Trained to about 19 on this text; uniform guessing is vocab_size (4096). The bound is
    # vocab_size / 10 with a 4x margin, so a broken loader, rope or tokenizer fails it.
    assert ppl < model.config.vocab_size / 40


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        '<|im_start|>user\nWhat does "hacker" mean?<|im_end|>\n<|im_start|>assistant\n'
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


def test_chat_turn_end_stops_generation(model, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.config.eos_token_id
    assert im_end in model.generation_config.eos_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=64, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] in model.generation_config.eos_token_id, "a greedy answer should end its turn"


@pytest.mark.parametrize("text", ["In the beginning God created the heaven and the earth.",
                                  "naïve café — 東京 ✓ 🙂\ttabs\n\nand   spaces",
                                  "def f(x):\n    return x ** 2  # 100%"])
def test_tokenizer_round_trips_utf8(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text
