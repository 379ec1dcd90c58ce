"""The small Llama model bundled with tpserve, so every command works without a download.

It was trained from scratch by `scripts/train_demo_model.py` on public-domain and
permissively licensed English text (the King James Bible, the Jargon File, BSD
fortunes, the Python documentation); see `demo_model/README.md`. It answers in the
style of that text and is meant for smoke tests and demos, not for real use.
"""

from __future__ import annotations

from pathlib import Path

from tpserve.engine.errors import ModelFormatError

DEMO_MODEL_NAME = "tpserve-demo"


def demo_model_path() -> Path:
    """The folder of the bundled Hugging Face model (config.json, model.safetensors, tokenizer)."""
    path = Path(__file__).parent / "demo_model"
    if not (path / "config.json").is_file():
        raise ModelFormatError(
            f"the bundled demo model is missing from {path}; reinstall tpserve, or re-create it "
            "with `python3 scripts/train_demo_model.py --out engine/demo_model`"
        )
    return path


def demo_heldout_text() -> str:
    """Text the demo model never saw in training, for perplexity checks."""
    return (demo_model_path() / "heldout.txt").read_text(encoding="utf-8")
