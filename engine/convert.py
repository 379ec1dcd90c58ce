"""Hugging Face checkpoint -> tpserve workspace, pre-split for tensor parallelism."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..parallel.linear import linear_method
from ..parallel.sharding import ShardPlan, padded_vocab, shard_layer, shard_vocab
from .checkpoint import CheckpointReader, read_hf_config, resolve_model_path
from .config import ModelConfig, QuantConfig, WorkspaceMeta
from .errors import ConfigError, ModelFormatError
from .models.families import Family, family_for
from .workspace import link_lmdeploy_alias, rank_dir, staged_directory, write_meta

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.tiktoken", "generation_config.json", "chat_template.*",
                   "config.json", "*.model")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layer_of(name: str) -> int | None:
    m = re.search(r"(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _quant_config(hf: dict, model_format: str, group_size: int, family: Family) -> QuantConfig:
    if model_format == "hf":
        if hf.get("quantization_config"):
            raise ConfigError("this checkpoint is quantized "
                              f"({hf['quantization_config'].get('quant_method')}); "
                              "convert it with --model-format awq")
        return QuantConfig()
    if model_format != "awq":
        raise ConfigError(f"--model-format must be hf or awq, got {model_format!r}")
    qc = hf.get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        raise ConfigError("--model-format awq needs an AWQ checkpoint (config.json with "
                          "quantization_config.quant_method = awq), such as the output of "
                          "`tpserve lite auto_awq`")
    if str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True):
        raise ConfigError("only AWQ 'gemm' checkpoints with zero points are supported")
    if not family.supports_awq:
        raise ConfigError(f"AWQ is not supported for {family.name} models yet")
    g = int(qc.get("group_size", group_size))
    if group_size and g != group_size:
        raise ConfigError(f"--group-size {group_size} differs from the checkpoint's group size {g}")
    return QuantConfig("awq", int(qc.get("bits", 4)), g)


def _check_tp(cfg: ModelConfig, tp: int, quant: QuantConfig) -> ShardPlan:
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    plan = ShardPlan(tp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    problems = plan.problems(quant.group_size)
    if problems:
        raise ConfigError(f"cannot split this model for --tp {tp}: " + "; ".join(problems))
    return plan


def convert(model_name: str, model_path: str | os.PathLike, dst_path: str | os.PathLike = "workspace",
            tp: int = 1, model_format: str = "hf", group_size: int = 0, dtype: str = "auto",
            progress: bool = True) -> Path:
    """Writes a workspace for `model_path` at `dst_path` and returns its path.

    model_name picks the chat template (see `tpserve list`); dtype "auto" keeps
    the checkpoint's float type.
    """
    from .chat_template import check_template_name

    check_template_name(model_name)
    src = resolve_model_path(model_path)
    hf = read_hf_config(src)
    family = family_for(hf)
    cfg = family.parse_config(hf)
    quant = _quant_config(hf, model_format, group_size, family)
    plan = _check_tp(cfg, tp, quant)
    reader = CheckpointReader(src)
    out_dtype = _output_dtype(dtype, cfg, reader)
    method = linear_method(quant.method, quant.group_size)
    to_canonical = family.weight_converter(cfg)
    by_layer: dict[int | None, list[str]] = defaultdict(list)
    for name in reader.names():
        if "rotary_emb.inv_freq" not in name:
            by_layer[_layer_of(name)].append(name)
    missing = [i for i in range(cfg.num_layers) if i not in by_layer]
    if missing:
        raise ModelFormatError(f"{src} lacks the weights of layer(s) {missing[:5]}; the "
                               f"checkpoint is incomplete: re-download it")
    vocab = padded_vocab(cfg.vocab_size, tp)
    with staged_directory(Path(dst_path)) as tmp:
        for r in range(tp):
            rank_dir(tmp, r).mkdir(parents=True)
        steps = tqdm(range(cfg.num_layers), desc="convert", unit="layer", disable=not progress)
        for i in steps:
            canon = _canonical(reader, by_layer[i], to_canonical, out_dtype)
            for r in range(tp):
                save_file(shard_layer(canon, i, plan, method, r),
                          rank_dir(tmp, r) / f"layer_{i:04d}.safetensors")
        canon = _canonical(reader, by_layer[None], to_canonical, out_dtype)
        _write_embed_head(tmp, canon, cfg, vocab, tp)
        copy_tokenizer(src, tmp / "tokenizer")
        link_lmdeploy_alias(tmp)
        weight_type = "int4" if quant.method == "awq" else _dtype_name(out_dtype)
        write_meta(tmp, WorkspaceMeta(
            model=cfg, model_name=model_name, tp=tp, weight_type=weight_type, quant=quant,
            padded_vocab_size=vocab, tokenizer_kind=family.tokenizer_kind,
            source=str(model_path)))
    return Path(dst_path).expanduser().resolve()


def _output_dtype(dtype: str, cfg: ModelConfig, reader: CheckpointReader) -> torch.dtype:
    if dtype != "auto":
        if dtype not in FLOAT_DTYPES:
            raise ConfigError(f"--dtype must be auto, {', '.join(FLOAT_DTYPES)}; got {dtype!r}")
        return FLOAT_DTYPES[dtype]
    # the type of the norm weights, which stay float in AWQ checkpoints too
    norms = [n for n in reader.names() if "norm" in n or ".ln" in n] or reader.names()
    stored = reader.get(norms[0]).dtype
    return stored if stored in FLOAT_DTYPES.values() else FLOAT_DTYPES.get(cfg.source_dtype,
                                                                            torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in FLOAT_DTYPES.items() if v == dtype)


def _canonical(reader: CheckpointReader, names: list[str], to_canonical, dtype) -> dict:
    out = {}
    for name in names:
        for cname, t in to_canonical(name, reader.get(name)):
            out[cname] = t.to(dtype) if t.is_floating_point() else t
    return out


def _write_embed_head(ws: Path, canon: dict, cfg: ModelConfig, vocab: int, tp: int) -> None:
    for key in ("embed_tokens.weight", "norm.weight"):
        if key not in canon:
            raise ModelFormatError(f"the checkpoint has no {key} (after renaming); it is "
                                   f"incomplete or not a {cfg.architecture}")
    head = canon.get("lm_head.weight")
    if head is None and not cfg.tie_word_embeddings:
        raise ModelFormatError("the checkpoint has no lm_head weight and does not tie embeddings")
    for r in range(tp):
        tensors = {"embed_tokens.weight": shard_vocab(canon["embed_tokens.weight"], vocab, tp, r),
                   "norm.weight": canon["norm.weight"]}
        if not cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = shard_vocab(head, vocab, tp, r)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  rank_dir(ws, r) / "embed_head.safetensors")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copies the tokenizer files of a model folder into a new folder dst."""
    dst.mkdir()
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, dst / f.name)


def cached_workspace(model_path: str | os.PathLike, tp: int, model_name: str | None) -> Path:
    """Converts a Hugging Face model once into a cache folder, for `LLM(hf_folder)`."""
    src = resolve_model_path(model_path)
    hf = read_hf_config(src)
    fmt = "awq" if (hf.get("quantization_config") or {}).get("quant_method") == "awq" else "hf"
    stamp = max((f.stat().st_mtime_ns for f in src.iterdir()), default=0)
    key = hashlib.sha256(f"{src.resolve()}|{stamp}|{tp}|{model_name}|v1".encode()).hexdigest()[:16]
    root = Path(os.environ.get("TPSERVE_CACHE", Path.home() / ".cache" / "tpserve"))
    dst = root / "workspaces" / f"{src.name}-{key}"
    if not (dst / "tpserve_config.json").is_file():
        name = model_name or ("auto" if _has_chat_template(src) else family_for(hf).default_template)
        convert(name, src, dst, tp=tp, model_format=fmt, progress=False)
    return dst


def _has_chat_template(src: Path) -> bool:
    config = src / "tokenizer_config.json"
    if (src / "chat_template.jinja").is_file() or (src / "chat_template.json").is_file():
        return True
    return config.is_file() and "chat_template" in json.loads(config.read_text())
