"""The README.md model card that `train_demo_model.py` writes next to the demo model."""

from __future__ import annotations

import math
from pathlib import Path

SAMPLE_PROMPTS = (
    ("text", "In the beginning"),
    ("text", "The Python tutorial"),
    ("chat", 'What does "hacker" mean?'),
    ("chat", "Quote John 3:16."),
    ("chat", "Tell me a fortune."),
    ("chat", "What is a list comprehension?"),
)


def _sources_table(sources: list[dict]) -> str:
    rows = ["| Debian package | version | licence |", "|---|---|---|"]
    rows += [f"| {s['package']} | {s['version']} | {s['license']} |" for s in sources]
    return "\n".join(rows)


def _samples(samples: list[dict]) -> str:
    lines = []
    for s in samples:
        shown = s["completion"].replace("\n", " ")
        lines.append(f"- [{s['kind']}] `{s['prompt']}` -> {shown}")
    return "\n".join(lines)


def write_model_card(path: Path, info: dict) -> None:
    shape, log, args = info["shape"], info["log"], info["args"]
    best_ppl = math.exp(log["best_heldout_loss"])
    text = f"""# tpserve-demo

A tiny Llama model trained from scratch, bundled with tpserve so that `convert`,
`chat`, `serve` and the benchmarks work without downloading anything. It writes
English in the style of its training text; it knows nothing useful. Do not use
it for anything but testing the software.

## Architecture

LlamaForCausalLM, {info['params'] / 1e6:.2f} M parameters, bf16 weights.
hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} attention heads of
{shape['hidden'] // shape['heads']}, {shape['kv_heads']} key/value heads (grouped-query attention),
MLP {shape['ffn']}, vocabulary {shape['vocab']} (byte-level BPE), tied input/output
embeddings, RoPE theta 10000, 2048 positions.

Special tokens: `<pad>` 0, `<s>` 1 (bos), `</s>` 2 (eos), `<|im_start|>` 3,
`<|im_end|>` 4. The chat template is ChatML; generation stops at `</s>` or
`<|im_end|>` (both are in `eos_token_id` of config.json and generation_config.json).

## Training data

{_sources_table(info['sources'])}

Each package was fetched with `apt-get download` and unpacked with `dpkg -x`;
`scripts/prepare_demo_corpus.py` turns it into documents (Bible chapters, Jargon
File entries, fortunes, 4 kB chunks of the Python docs' reST sources) plus
single-turn chat pairs made from them (Jargon term -> definition, verse
reference -> verse, "Tell me a fortune." -> fortune). About 3% of the
documents, chosen by a stable hash, are held out; `heldout.txt` holds
plain-text held-out documents, round-robin over the sources.

## Recipe

`scripts/train_demo_model.py`: {info['train_tokens'] / 1e6:.2f} M training tokens
({info['heldout_tokens'] / 1e3:.0f} k held out); AdamW (betas 0.9/0.95, weight decay
0.1, peak lr {args['lr']}, {args['warmup']} warmup steps, cosine to 10%), batch
{args['batch_size']} x {args['seq_len']} tokens, {'fp32' if info['device'] == 'cpu' else 'bf16 autocast'}, grad clip 1.0,
{log['steps']} steps ({log['tokens_seen'] / 1e6:.0f} M tokens) in {log['seconds']:.0f} s on
{info['device']}, seed {args['seed']}. The weights kept are those of the step with
the lowest held-out loss (step {log['best_step']}). To re-create it:

    python3 scripts/prepare_demo_corpus.py --work .demo_data
    python3 scripts/train_demo_model.py --corpus .demo_data --out engine/demo_model \\
        --steps {log['steps']} --warmup {args['warmup']} --eval-every {args['eval_every']} \\
        --batch-size {args['batch_size']} --seq-len {args['seq_len']} --lr {args['lr']} --seed {args['seed']}{' --small' if args['small'] == 'True' else ''}

## Evaluation

- Held-out perplexity (all held-out documents, as in training): {best_ppl:.2f}
- Held-out perplexity on the first 4096 tokens of heldout.txt (float32): {info['heldout_txt_ppl']:.2f}
  (uniform guessing would be {shape['vocab']})

## Sample generations (temperature 0.7, top-p 0.9)

{_samples(info['samples'])}
"""
    path.write_text(text, encoding="utf-8")
