import math

import pytest
import torch

from tpserve.quant.ppl import hf_perplexity, perplexity, sequential_windows
from test_quant_models import VOCAB, make_tiny, write_calib_text


def test_uniform_logits_give_vocab_size():
    windows = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(lambda ids: torch.zeros(1, ids.shape[1], 50), windows) == pytest.approx(50.0)


def test_perfect_prediction_gives_one():
    windows = torch.arange(20).reshape(2, 10)

    def oracle(ids):
        logits = torch.full((1, ids.shape[1], 32), -1e4)
        logits[0, torch.arange(ids.shape[1]), (ids[0] + 1) % 32] = 0.0
        return logits

    assert perplexity(oracle, windows) == pytest.approx(1.0)


def test_sequential_windows():
    ids = torch.arange(25)
    assert torch.equal(sequential_windows(ids, 10), torch.arange(20).reshape(2, 10))
    assert sequential_windows(ids, 10, max_windows=1).shape == (1, 10)


def test_hf_perplexity_matches_transformers_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny(tmp_path / "model", num_key_value_heads=2)
    texts = open(write_calib_text(tmp_path / "text.txt", lines=6)).read().splitlines()
    got = hf_perplexity(path, texts, seqlen=32, samples=3, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(path)("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids[:96].reshape(3, 32)]
    assert got == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert 1.0 < got < 2 * VOCAB
