"""Train tpserve's bundled demo model: a byte-level BPE tokenizer and a ~11 M parameter
Llama, from the corpus that `scripts/prepare_demo_corpus.py` writes.

  python3 scripts/prepare_demo_corpus.py --work .demo_data
  python3 scripts/train_demo_model.py --corpus .demo_data --out engine/demo_model --device cuda
  python3 scripts/train_demo_model.py --small --out /tmp/demo_small      # CPU smoke run

The output folder is a Hugging Face model folder (config.json, generation_config.json,
model.safetensors in bf16, tokenizer.json, tokenizer_config.json with a ChatML
chat_template, special_tokens_map.json) plus heldout.txt and a README.md model card.
It is written to a temporary folder first and renamed into place.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from demo_model_card import SAMPLE_PROMPTS, write_model_card  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS, IM_START, IM_END = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FULL = dict(vocab=4096, hidden=512, layers=4, heads=8, kv_heads=4, ffn=1024)
SMALL = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
HELDOUT_TXT_CHARS = 200_000


def load_corpus(folder: Path, fraction: float) -> tuple[list[dict], list[dict]]:
    path = folder / "corpus.jsonl.gz"
    if not path.is_file():
        sys.exit(f"{path} not found: run `python3 scripts/prepare_demo_corpus.py --work {folder}` first")
    records = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    if fraction < 1:
        records = records[:: round(1 / fraction)]
    train = [r for r in records if r["split"] == "train"]
    return train, [r for r in records if r["split"] == "heldout"]


def render(record: dict, tokenizer: PreTrainedTokenizerFast) -> str:
    """A record as the text the model trains on; chat pairs go through the chat template."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tokenize=False) + "</s>"
    return f"<s>{record['text']}</s>"


def train_tokenizer(records: list[dict], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    texts = (r.get("text") or "\n".join(m["content"] for m in r["messages"]) for r in records)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def token_stream(records: list[dict], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    texts = [render(r, tokenizer) for r in records]
    ids = tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)
    return torch.from_numpy(np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in ids]))


def build_model(shape: dict, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=max_positions,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=[EOS, IM_END], pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, device: str, max_windows: int = 256) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    windows = stream[: n * seq_len + 1]
    total, count = 0.0, 0
    for i in range(0, n, 16):
        rows = torch.stack([windows[j * seq_len: j * seq_len + seq_len + 1] for j in range(i, min(n, i + 16))])
        rows = rows.to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + rows[:, 1:].numel()
    model.train()
    return total / count


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_ids, heldout_ids, args) -> tuple[dict, dict]:
    """AdamW with warmup + cosine decay; returns the best (lowest held-out loss) weights and a log."""
    device, seq, bs = args.device, args.seq_len, args.batch_size
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(args.seed)
    total, start, best = args.steps, time.time(), {"loss": float("inf"), "step": -1}
    log = {"evals": [], "tokens_seen": 0}
    step = 0
    while step < total:
        starts = torch.randint(0, len(train_ids) - seq - 1, (bs,), generator=gen)
        rows = torch.stack([train_ids[s: s + seq + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log["tokens_seen"] += bs * seq
        if step == 20:
            timer_start = time.time()  # the first steps include CUDA warm-up; time the next 40
        if step == 60 and args.time_budget_s:
            per_step = (time.time() - timer_start) / 40
            total = max(step + 1, min(args.steps, int(args.time_budget_s / per_step)))
            print(f"{per_step * 1000:.1f} ms/step -> training for {total} steps", flush=True)
        if step % args.eval_every == 0 or step == total:
            held = heldout_loss(model, heldout_ids, seq, device)
            log["evals"].append({"step": step, "train_loss": round(loss.item(), 4), "heldout_loss": round(held, 4)})
            print(f"step {step}/{total} train {loss.item():.3f} heldout {held:.3f} "
                  f"ppl {math.exp(held):.1f} {time.time() - start:.0f}s", flush=True)
            if held < best["loss"]:
                best = {"loss": held, "step": step,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    log.update(steps=step, seconds=round(time.time() - start, 1), best_step=best["step"],
               best_heldout_loss=round(best["loss"], 4))
    return best["state"], log


def heldout_text(records: list[dict]) -> str:
    """Plain-text held-out documents, round-robin over sources, capped at HELDOUT_TXT_CHARS."""
    by_source: dict[str, list[str]] = {}
    for r in records:
        if "text" in r:
            by_source.setdefault(r["source"], []).append(r["text"])
    parts, size, queues = [], 0, [list(v) for v in by_source.values()]
    while size < HELDOUT_TXT_CHARS and any(queues):
        for q in queues:
            if q and size < HELDOUT_TXT_CHARS:
                parts.append(q.pop(0))
                size += len(parts[-1]) + 2
    return "\n\n".join(parts)[:HELDOUT_TXT_CHARS] + "\n"


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int = 4096) -> float:
    """Float32 perplexity of the first max_tokens tokens of text, in windows (as the CPU test does)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0, : max_tokens + 1]
    model = model.float().eval()
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s: s + window + 1].unsqueeze(0).to(model.device)
        logits = model(chunk[:, :-1]).logits
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def sample_generations(model, tokenizer, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    out = []
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
        else:
            text = "<s>" + prompt
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        gen = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.7, top_p=0.9)
        out.append({"kind": kind, "prompt": prompt,
                    "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def save_folder(out: Path, model, tokenizer, heldout: str, card_info: dict) -> None:
    """Write the whole folder under a temporary name, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=[EOS, IM_END], pad_token_id=PAD,
        do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=256)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config_path = tmp / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE  # in tokenizer_config.json, where every reader looks
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4 and 5 both load
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2) + "\n")
    (tmp / "heldout.txt").write_text(heldout, encoding="utf-8")
    write_model_card(tmp / "README.md", card_info)
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train tpserve's bundled demo model.")
    p.add_argument("--corpus", type=Path, default=Path(".demo_data"), help="folder holding corpus.jsonl.gz")
    p.add_argument("--out", type=Path, default=Path("engine/demo_model"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=1300, help="optimizer steps (1300: the bundled model)")
    p.add_argument("--time-budget-s", type=float, default=0, help="cap steps to fit this many seconds (0: no cap)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--small", action="store_true", help="tiny model on 3%% of the corpus: a CPU smoke run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.small:
        args.steps, args.seq_len, args.batch_size = min(args.steps, 40), min(args.seq_len, 128), 8
        args.warmup, args.eval_every = 5, 20
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    shape = SMALL if args.small else FULL
    train_recs, held_recs = load_corpus(args.corpus, 0.03 if args.small else 1.0)
    t0 = time.time()
    tokenizer = train_tokenizer(train_recs, shape["vocab"])
    train_ids, held_ids = token_stream(train_recs, tokenizer), token_stream(held_recs, tokenizer)
    print(f"tokenizer + encoding {time.time() - t0:.0f}s: {len(train_ids)} train / {len(held_ids)} "
          f"held-out tokens", flush=True)
    model = build_model(shape, max_positions=2048)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters", flush=True)
    best_state, log = train(model, train_ids, held_ids, args)
    model.load_state_dict(best_state)
    held_txt = heldout_text(held_recs)
    ppl_txt = text_perplexity(model, tokenizer, held_txt)
    samples = sample_generations(model, tokenizer, args.seed)
    for s in samples:
        print(f"[{s['kind']}] {s['prompt']!r} -> {s['completion']!r}")
    sources_path = args.corpus / "sources.json"
    card_info = dict(
        params=n_params, shape=shape, args={k: str(v) for k, v in vars(args).items()}, log=log,
        train_tokens=len(train_ids), heldout_tokens=len(held_ids), heldout_txt_ppl=ppl_txt,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        sources=json.loads(sources_path.read_text()) if sources_path.is_file() else [], samples=samples)
    save_folder(args.out, model, tokenizer, held_txt, card_info)
    print(json.dumps({k: card_info[k] for k in ("params", "train_tokens", "heldout_txt_ppl")}
                     | {"best_heldout_ppl": math.exp(log["best_heldout_loss"]), "out": str(args.out)}))


if __name__ == "__main__":
    main()
