"""Tokenizers: transformers' for most families; Qwen v1's tiktoken BPE read
straight from its `qwen.tiktoken` file (so no remote code has to run)."""
from __future__ import annotations

import base64
from pathlib import Path

from .errors import ModelFormatError

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                 *(f"<|extra_{i}|>" for i in range(205)))


class QwenTiktokenTokenizer:
    """The subset of a transformers tokenizer tpserve uses, over Qwen v1's BPE file."""

    def __init__(self, vocab_file: Path) -> None:
        import tiktoken

        ranks = {}
        for line in vocab_file.read_text().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)}
        self._enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self._id_to_bytes = {v: k for k, v in ranks.items()}
        self._id_to_bytes.update({v: k.encode() for k, v in self.special_tokens.items()})
        self.eos_token = "<|endoftext|>"
        self.eos_token_id = self.special_tokens[self.eos_token]
        self.bos_token = None
        self.bos_token_id = None
        self.pad_token_id = self.eos_token_id
        self.chat_template = None
        self.all_special_ids = list(self.special_tokens.values())

    def __len__(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = set(self.all_special_ids)
        data = b"".join(self._id_to_bytes.get(i, b"") for i in ids
                        if not (skip_special_tokens and i in special))
        return data.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_bytes.get(ids, b"")
        return [self._id_to_bytes.get(i, b"") for i in ids]

    def convert_tokens_to_string(self, tokens) -> str:
        return b"".join(t if isinstance(t, bytes) else t.encode() for t in tokens).decode(
            "utf-8", errors="replace")

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.special_tokens.get(token)


def load_tokenizer(folder: Path, kind: str = "hf"):
    """The tokenizer saved in a workspace's `tokenizer/` folder (or a HF model folder);
    None when the folder is empty (a workspace driven with token ids only)."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if kind == "qwen_tiktoken":
        vocab = folder / "qwen.tiktoken"
        if not vocab.is_file():
            raise ModelFormatError(f"{folder} has no qwen.tiktoken; copy the model's tokenizer "
                                   f"files and convert again")
        return QwenTiktokenTokenizer(vocab)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise ModelFormatError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); the model "
                               f"folder needs its tokenizer files") from None
    # the engine checks lengths against its own context (with a message that says what
    # to do); transformers' warning past the model's maximum would only add noise
    tokenizer.model_max_length = int(1e30)
    return tokenizer
