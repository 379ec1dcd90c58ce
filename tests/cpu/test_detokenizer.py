import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tpserve.engine.detokenizer import IncrementalDetokenizer, stop_reason
from tpserve.engine.sampling_params import SamplingParams

TEXT = "hello 你好🙂 world, 天气🚀 fine"


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE: Chinese characters and emoji span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world, this is a test of streaming text",
              "你好，世界！今天天气很好 🙂🚀", "the quick brown fox jumps over the lazy dog"] * 10
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def stream(tokenizer, ids, params, prompt=()):
    detok = IncrementalDetokenizer(tokenizer, list(prompt), params)
    deltas, stop = [], None
    for token in ids:
        stop = detok.add_tokens([token])
        deltas.append(detok.take_delta(finished=stop is not None))
        if stop is not None:
            break
    else:
        detok.flush()
        deltas.append(detok.take_delta(finished=True))
    return detok, deltas, stop


def test_text_splits_characters_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # otherwise the test proves nothing
    assert tokenizer.decode(ids) == TEXT


def test_streaming_emits_only_complete_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok, deltas, stop = stream(tokenizer, ids, SamplingParams(), prompt=tokenizer.encode("say: "))
    assert stop is None
    assert "".join(deltas) == TEXT == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # it streams, not all at the end


def test_prompt_window_keeps_the_first_space(tokenizer):
    prompt = tokenizer.encode("hello")
    ids = tokenizer.encode(" world, fine")
    _, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt=prompt)
    assert "".join(deltas) == " world, fine"


@pytest.mark.parametrize("stop", ["好🙂 w", "🙂", "d, 天"])
def test_stop_string_spanning_tokens(tokenizer, stop):
    ids = tokenizer.encode(TEXT)
    detok, deltas, found = stream(tokenizer, ids, SamplingParams(stop=[stop, "never there"]))
    assert found == stop
    assert "".join(deltas) == detok.text == TEXT[:TEXT.index(stop)]
    # nothing past the start of the stop string was ever handed out
    emitted = ""
    for d in deltas:
        emitted += d
        assert TEXT.index(stop) >= len(emitted)


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok, _, found = stream(tokenizer, ids, SamplingParams(stop=["fine", "world"]))
    assert found == "world" and detok.text == "hello 你好🙂 "


def test_held_back_text_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("hello wor")
    detok, deltas, found = stream(tokenizer, ids, SamplingParams(stop=["world"]))
    assert found is None
    assert deltas[-1].endswith("wor") and "".join(deltas) == "hello wor"


def test_incomplete_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 你")
    partial = ids[:-1] if tokenizer.decode(ids[:-1]).endswith("\ufffd") else ids
    detok, deltas, _ = stream(tokenizer, partial, SamplingParams())
    assert "".join(deltas) == tokenizer.decode(partial)


def test_special_tokens_skipped(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    ids = tokenizer.encode("hello") + [eos] + tokenizer.encode(" world")
    _, deltas, _ = stream(tokenizer, ids, SamplingParams())
    assert "".join(deltas) == "hello world"
    _, deltas, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "hello<eos> world"


def test_stop_reason():
    p = SamplingParams(max_tokens=5, stop_token_ids=[9])
    args = dict(eos_token_ids=[2], session_len=100)
    assert stop_reason(2, 1, 10, p, **args) == "stop"
    assert stop_reason(9, 1, 10, p, **args) == "stop"
    assert stop_reason(3, 1, 10, p, **args) is None
    assert stop_reason(3, 5, 10, p, **args) == "length"
    assert stop_reason(3, 1, 100, p, **args) == "length"
    assert stop_reason(2, 1, 10, SamplingParams(ignore_eos=True), **args) is None
