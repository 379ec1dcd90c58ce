"""Shared pieces of the benchmarks: real-shape random models (as a tpserve
workspace and as a transformers model), and the copy bandwidth of the card."""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpserve.engine.config import ModelConfig, QuantConfig, WorkspaceMeta
from tpserve.engine.convert import copy_tokenizer
from tpserve.engine.demo_model import demo_model_path
from tpserve.engine.loader import write_kv_qparams
from tpserve.engine.workspace import is_workspace, rank_dir, read_meta, write_meta
from tpserve.parallel.linear import AWQMethod, UnquantizedMethod
from tpserve.parallel.sharding import ShardPlan, padded_vocab, shard_layer, shard_vocab

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, rope_theta=500000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, rope_theta=10000.0),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1000000.0,
                       qkv_bias=True),
    # for measuring host-side costs on a CPU: the forward takes next to nothing
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, rope_theta=10000.0),
}


def model_config(shape: str, layers: int | None = None) -> ModelConfig:
    s = dict(SHAPES[shape])
    if layers:
        s["num_layers"] = layers
    return ModelConfig(architecture="LlamaForCausalLM", head_dim=s["hidden_size"] // s["num_heads"],
                       rms_norm_eps=1e-5, max_position_embeddings=8192, **s)


def random_workspace(cfg: ModelConfig, dst: Path, tp: int = 1, dtype=torch.bfloat16,
                     awq_group: int = 0) -> Path:
    """Writes a workspace of random weights in cfg's shape (fast: made on the GPU);
    awq_group > 0: linear layers as random 4-bit AWQ weights with that group size."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plan = ShardPlan(tp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    method = AWQMethod(awq_group) if awq_group else UnquantizedMethod()
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    linears = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
               "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
               "mlp.down_proj": (inter, h)}
    for r in range(tp):
        rank_dir(dst, r).mkdir(parents=True, exist_ok=True)
    for i in range(cfg.num_layers):
        t = {f"layers.{i}.{n}.{k}": _random_param(shape, pdtype, dev)
             for n, (fin, fout) in linears.items()
             for k, (shape, pdtype) in _param_shapes(method, fin, fout, dtype).items()}
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"layers.{i}.{n}.weight"] = torch.ones(h, device=dev, dtype=dtype)
        if cfg.qkv_bias:
            for n, size in (("q", q), ("k", kv), ("v", kv)):
                t[f"layers.{i}.self_attn.{n}_proj.bias"] = _random_param((size,), dtype, dev)
        for r in range(tp):
            part = {k: v.cpu() for k, v in shard_layer(t, i, plan, method, r).items()}
            save_file(part, rank_dir(dst, r) / f"layer_{i:04d}.safetensors")
    vocab = padded_vocab(cfg.vocab_size, tp)
    embed = torch.randn(cfg.vocab_size, h, device=dev, dtype=dtype) * 0.02
    head = torch.randn(cfg.vocab_size, h, device=dev, dtype=dtype) * 0.02
    # logit 0 for ids the demo tokenizer lacks: greedy picks a positive logit among the
    # others (almost surely), so served text is real text and every token streams some
    head[demo_tokenizer_size():] = 0
    for r in range(tp):
        save_file({"embed_tokens.weight": shard_vocab(embed, vocab, tp, r).cpu(),
                   "lm_head.weight": shard_vocab(head, vocab, tp, r).cpu(),
                   "norm.weight": torch.ones(h, dtype=dtype)},
                  rank_dir(dst, r) / "embed_head.safetensors")
    # the bundled demo model's tokenizer (4096 ids, valid in any of these vocabularies),
    # so that servers over a random workspace can take text
    copy_tokenizer(demo_model_path(), dst / "tokenizer")
    quant = QuantConfig("awq", 4, awq_group) if awq_group else QuantConfig()
    write_meta(dst, WorkspaceMeta(model=cfg, model_name="auto", tp=tp,
                                  weight_type="int4" if awq_group else str(dtype).removeprefix("torch."),
                                  quant=quant, padded_vocab_size=vocab))
    return dst


def write_placeholder_kv_qparams(ws: Path, scale: float = 0.04) -> None:
    """int8-KV parameters as `lite kv_qparams` writes them, with one (scale, zero point 0)
    for every layer, K and V: the random models' keys and values (std about 1.3) fit
    +-128 steps of 0.04. For timing the calibrated path; a real model is calibrated."""
    meta = read_meta(ws)
    one = torch.tensor([scale, 0.0, scale, 0.0])
    write_kv_qparams(ws, {(layer, rank): one.clone() for layer in range(meta.model.num_layers)
                          for rank in range(meta.tp)})


def demo_tokenizer_size() -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(demo_model_path()))


def _param_shapes(method, fin: int, fout: int, dtype) -> dict:
    if isinstance(method, AWQMethod):
        return method.shapes(fin, fout, dtype)
    return {"weight": ((fout, fin), dtype)}


def _random_param(shape, dtype, dev) -> torch.Tensor:
    if dtype == torch.int32:  # packed nibbles: any bits
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, device=dev)
    return torch.randn(shape, device=dev, dtype=dtype) * 0.02


def workspace_for(cfg: ModelConfig, given: str | None, tp: int = 1, awq_group: int = 0) -> Path:
    """The --workspace a benchmark was given, else a fresh random one in cfg's shape."""
    import tempfile

    if given:
        return Path(given)
    return random_workspace(cfg, Path(tempfile.mkdtemp(prefix="tpserve-bench-")) / "ws", tp,
                            awq_group=awq_group)


def hf_model(cfg: ModelConfig, dtype=torch.bfloat16):
    """A transformers Llama of the same shape (random weights), for the baseline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                     max_position_embeddings=8192, rope_theta=cfg.rope_theta,
                     attention_bias=cfg.qkv_bias, torch_dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype directly: no float32 copy of 8B weights
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def kv_bytes(cfg: ModelConfig, tokens: int, bytes_per_value: float = 2.0) -> float:
    """Bytes of K and V read by one decode step over `tokens` cached tokens in all."""
    return 2 * cfg.num_layers * cfg.kv_size * bytes_per_value * tokens


def weight_bytes(cfg: ModelConfig, bytes_per_weight: float = 2.0, awq_group: int = 0) -> float:
    """Bytes of weights one decode step reads (linear layers at 4 bits plus their
    scales and zeros when awq_group > 0)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * inter
    linear = cfg.num_layers * per_layer * bytes_per_weight
    if awq_group:  # 0.5 byte a weight, a 2-byte scale and a 0.5-byte zero per group
        linear = cfg.num_layers * per_layer * (0.5 + 2.5 / awq_group)
    # the embedding row read per token is negligible; the LM head is read whole
    return linear + cfg.vocab_size * h * bytes_per_weight


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the practical ceiling)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    iters = 20
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * n_bytes * iters / (time.perf_counter() - start)


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def free_gpu_memory() -> None:
    """Drops what a shut-down engine left behind, so the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    """Writes one random workspace, to be shared by several benchmarks (--workspace)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("dst")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--awq-group", type=int, default=0, help="> 0: random 4-bit AWQ weights")
    p.add_argument("--kv-qparams", action="store_true",
                   help="also write placeholder int8-KV parameters (an existing workspace at "
                        "dst only gets those)")
    args = p.parse_args()
    start = time.perf_counter()
    dst = Path(args.dst)
    if not (args.kv_qparams and is_workspace(dst)):
        random_workspace(model_config(args.shape, args.layers), dst, args.tp,
                         awq_group=args.awq_group)
        print(f"random {args.shape} workspace in {dst} ({time.perf_counter() - start:.0f} s)")
    if args.kv_qparams:
        write_placeholder_kv_qparams(dst)
        print(f"placeholder int8-KV parameters in {dst}")


if __name__ == "__main__":
    main()
