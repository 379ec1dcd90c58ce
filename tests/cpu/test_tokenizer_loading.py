"""Both tokenizer loaders (the engine's, from a workspace or model folder, and the
quantization jobs', from a model) take whole texts longer than the model's maximum
without transformers' length warning, and tokenize them as transformers does."""

import logging

import pytest
from transformers import AutoTokenizer

from tpserve.engine.demo_model import demo_heldout_text, demo_model_path
from tpserve.engine.tokenizer import load_tokenizer as engine_tokenizer
from tpserve.quant.hf_model import load_tokenizer as quant_tokenizer


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("load", [lambda p: engine_tokenizer(p), lambda p: quant_tokenizer(str(p))],
                         ids=["engine", "quant"])
def test_long_text_without_length_warning(load):
    path = demo_model_path()
    text = demo_heldout_text()
    plain = AutoTokenizer.from_pretrained(str(path))
    want = plain(text, add_special_tokens=False)["input_ids"]
    assert len(want) > plain.model_max_length  # the case the warning is about
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        got = load(path)(text, add_special_tokens=False)["input_ids"]
    finally:
        logger.removeHandler(records)
    assert got == want
    assert not [m for m in records.messages if "sequence length" in m], records.messages
