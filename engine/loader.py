"""Workspace rank -> a DecoderModel with that rank's weights on the device."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..parallel.comm import LocalGroup, TPGroup
from ..parallel.linear import ParallelLinear, linear_method
from ..parallel.sharding import ShardPlan
from .config import WorkspaceMeta
from .errors import ModelFormatError
from .models.decoder import DecoderModel
from .workspace import rank_dir

KV_QPARAMS_FILE = "kv_qparams.safetensors"


def build_model(workspace: Path, meta: WorkspaceMeta, rank: int, dtype: torch.dtype,
                device: torch.device, group: TPGroup = LocalGroup(),
                max_positions: int | None = None) -> DecoderModel:
    cfg = meta.model
    plan = ShardPlan(meta.tp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    method = linear_method(meta.quant.method, meta.quant.group_size)
    with torch.device(device):
        model = DecoderModel(cfg, plan, method, meta.padded_vocab_size, dtype, group, max_positions)
    load_rank_weights(model, rank_dir(workspace, rank))
    for module in model.modules():
        if isinstance(module, ParallelLinear):
            module.finalize()
    return model.eval()


def load_rank_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copies every tensor of a rank folder into the model's same-named buffer."""
    targets = dict(model.named_buffers())
    targets = {k: v for k, v in targets.items() if k != "cos_sin"}
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != KV_QPARAMS_FILE)
    if not files:
        raise ModelFormatError(f"{folder} holds no weights; the workspace is incomplete: "
                               f"convert the model again")
    seen = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in targets:
                        raise ModelFormatError(f"{file} has an unexpected tensor {name}; the "
                                               f"workspace does not match this tpserve version")
                    src = f.get_tensor(name)
                    dst = targets[name]
                    if tuple(src.shape) != tuple(dst.shape):
                        raise ModelFormatError(f"{name} in {file} has shape {tuple(src.shape)}, "
                                               f"expected {tuple(dst.shape)}; convert again")
                    dst.copy_(src.to(dst.dtype) if src.is_floating_point() else src)
                    seen.add(name)
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(f"cannot read {file} ({exc}); convert the model again") from None
    missing = sorted(set(targets) - seen)
    if missing:
        raise ModelFormatError(f"the workspace lacks {len(missing)} tensor(s) for this rank "
                               f"(e.g. {missing[0]}); convert the model again")


def load_kv_qparams(workspace: Path, rank: int,
                    num_layers: int) -> list[tuple[float, float, float, float]] | None:
    """Calibrated int8-KV (k_scale, k_zp, v_scale, v_zp) per layer, or None."""
    file = rank_dir(workspace, rank) / KV_QPARAMS_FILE
    if not file.is_file():
        return None
    with safe_open(file, framework="pt") as f:
        try:
            return [tuple(float(x) for x in f.get_tensor(f"layers.{i}.past_kv_scale"))
                    for i in range(num_layers)]
        except (SafetensorError, KeyError) as exc:
            raise ModelFormatError(f"{file} is incomplete ({exc}); run `tpserve lite kv_qparams` "
                                   f"again") from None


def write_kv_qparams(workspace: Path, params: dict[tuple[int, int], torch.Tensor]) -> None:
    """Saves {(layer, rank): (k_scale, k_zp, v_scale, v_zp)} into each rank's folder."""
    from safetensors.torch import save_file

    from .workspace import read_meta

    meta = read_meta(workspace)
    for rank in range(meta.tp):
        tensors = {f"layers.{layer}.past_kv_scale": params[(layer, rank)].float().contiguous()
                   for layer in range(meta.model.num_layers)}
        folder = rank_dir(workspace, rank)
        tmp = folder / f".{KV_QPARAMS_FILE}.tmp"
        save_file(tensors, tmp)
        tmp.replace(folder / KV_QPARAMS_FILE)
