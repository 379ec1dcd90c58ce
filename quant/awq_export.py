"""Writing a Hugging Face AWQ ("GEMM") checkpoint from the per-layer results.

The folder gets the original ``config.json`` plus ``quantization_config``,
safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n`` with an
index when larger than one shard), and every other top-level file of the
source model (tokenizer, generation config, chat template). Files are written
to a temporary folder inside the destination, then renamed into place with
``config.json`` last, so a folder with a ``config.json`` is complete.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tpserve.quant.awq_layer import AwqSettings

MAX_SHARD_BYTES = 4 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_NAME = "model.safetensors.index.json"


def quantization_config(settings: AwqSettings) -> dict:
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": settings.bits,
        "group_size": settings.group_size,
        "zero_point": True,
    }


def non_layer_tensors(model: nn.Module, tied: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """Embeddings, final norm and LM head (dropped when tied to the embeddings)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers.") or (tied and name == "lm_head.weight"):
            continue
        out[name] = t.to(dtype).contiguous()
    return out


def _layer_entries(layer_files: list[Path]) -> list[tuple[str, Path, int]]:
    entries = []
    for path in layer_files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                size = _dtype_bytes(sl.get_dtype())
                for dim in sl.get_shape():
                    size *= dim
                entries.append((name, path, size))
    return entries


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(name, 1)


def _plan_shards(entries: list[tuple[str, object, int]]) -> list[list[tuple[str, object, int]]]:
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[2] > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[2]
    return shards + [current] if current else shards


def _write_shards(entries, tmp: Path) -> list[str]:
    shards = _plan_shards(entries)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {key: _fetch(key, source) for key, source, _ in shard}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(size for *_, size in shard)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        names.append(INDEX_NAME)
    return names


def _fetch(key: str, source) -> Tensor:
    if isinstance(source, Tensor):
        return source
    with safe_open(source, framework="pt") as f:
        return f.get_tensor(key)


def _copy_side_files(model_path: Path, tmp: Path) -> list[str]:
    copied = []
    for src in sorted(model_path.iterdir()):
        if not src.is_file() or src.name == "config.json" or src.name.endswith(WEIGHT_SUFFIXES):
            continue
        if src.name.endswith(".index.json"):
            continue
        shutil.copy2(src, tmp / src.name)
        copied.append(src.name)
    return copied


def _remove_old_weights(dst: Path) -> None:
    for old in list(dst.glob("model*.safetensors")) + [dst / INDEX_NAME, dst / "config.json"]:
        if old.is_file():
            old.unlink()


def write_awq_checkpoint(
    model: nn.Module, model_path: str, dst: str, layer_files: list[Path], settings: AwqSettings,
    config: dict, dtype: torch.dtype,
) -> str:
    """Write the checkpoint into ``dst`` (which may hold other files, e.g. calibration stats)."""
    dst_path = Path(dst)
    tmp = dst_path / f".awq_export.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = bool(config.get("tie_word_embeddings", False))
    entries = [(k, t, t.numel() * t.element_size()) for k, t in non_layer_tensors(model, tied, dtype).items()]
    files = _write_shards(entries + _layer_entries(layer_files), tmp) + _copy_side_files(Path(model_path), tmp)
    out_config = dict(config, quantization_config=quantization_config(settings))
    (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    _remove_old_weights(dst_path)
    for name in files + ["config.json"]:
        os.replace(tmp / name, dst_path / name)
    tmp.rmdir()
    return str(dst_path)
