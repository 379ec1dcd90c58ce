"""`lite auto_awq`: activation-aware 4-bit weight quantization of a Hugging Face model.

The decoder layers are processed in order. Layer ``i`` sees the hidden states
the full-precision model produces at its input on the calibration windows
(as in AutoAWQ: folding scales does not change a layer's float output, and
its output is taken before clipping). For each layer: record the inputs of
its linears, search the AWQ scales (``awq_search``), fold them into the
preceding norms/linears, optionally search weight clipping, quantize every
linear group-wise and save the layer's checkpoint tensors under
``work_dir/awq_layers/``. A re-run with the same ``work_dir`` and settings
skips finished layers (it only replays their float forward). At the end the
Hugging Face AWQ checkpoint is written into ``work_dir`` (``awq_export``);
``awq_layers/`` may then be deleted.

The searches of one layer's four linear groups are independent: with
``num_workers > 1`` (or a ``ray_address``) they run as Ray tasks.
"""

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tpserve.engine.errors import ConfigError
from tpserve.quant import awq_layer, hf_model
from tpserve.quant.awq_export import write_awq_checkpoint
from tpserve.quant.awq_layer import AwqSettings, FeatureRecorder, sample_positions
from tpserve.quant.datasets import calib_windows, load_calib_texts
from tpserve.quant.layer_store import LayerStore
from tpserve.quant.pack import PACK_FACTOR
from tpserve.quant.ray_tasks import RayMapper, cluster_has_gpus, ray_session

SEARCH_TOKENS = 8192  # calibration tokens (sampled evenly per window) that feed the searches
BATCH_TOKENS = 16384  # tokens per layer forward call


class _StopForward(Exception):
    pass


def _check_settings(w_bits: int, w_group_size: int, num_workers: int) -> None:
    if w_bits != 4:
        raise ConfigError(f"--w-bits {w_bits} is not supported; the AWQ GEMM format stores 4-bit weights")
    if w_group_size <= 0:
        raise ConfigError(f"--w-group-size must be positive, got {w_group_size}")
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {num_workers}")


def _check_shapes(model: nn.Module, group_size: int) -> None:
    for rel, linear in hf_model.layer_linears(hf_model.decoder_layers(model)[0]).items():
        if linear.in_features % group_size:
            raise ConfigError(
                f"{rel} has {linear.in_features} input features, not a multiple of --w-group-size "
                f"{group_size}; pick a group size that divides it (e.g. 64 or 32)"
            )
        if linear.out_features % PACK_FACTOR:
            raise ConfigError(
                f"{rel} has {linear.out_features} outputs, not a multiple of {PACK_FACTOR}; "
                "the AWQ format cannot pack it"
            )


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: Tensor, dev: torch.device) -> tuple[Tensor, dict]:
    """Hidden states entering layer 0 (``[n, seqlen, hidden]``) and the keyword args it receives."""
    base, layers = model.model, hf_model.decoder_layers(model)
    hidden, layer_kwargs = [], {}

    def grab(_m, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    base.embed_tokens.to(dev)
    base.rotary_emb.to(dev)
    try:
        for ids in windows:
            with contextlib.suppress(_StopForward):
                base(input_ids=ids[None].to(dev), use_cache=False)
    finally:
        handle.remove()
        base.embed_tokens.cpu()
        base.rotary_emb.cpu()
    return torch.cat(hidden), layer_kwargs


@torch.no_grad()
def layer_forward(layer: nn.Module, inps: Tensor, kwargs: dict) -> Tensor:
    """The layer applied to every window; the kwargs (batch 1) broadcast over the batch."""
    outs = torch.empty_like(inps)
    batch = max(1, BATCH_TOKENS // inps.shape[1])
    for b in range(0, inps.shape[0], batch):
        out = layer(inps[b:b + batch], **kwargs)
        outs[b:b + batch] = out[0] if isinstance(out, tuple) else out
    return outs


@contextlib.contextmanager
def _search_mapper(num_workers: int, ray_address: str | None, dev: torch.device):
    if num_workers == 1 and not ray_address:
        yield awq_layer.local_map
        return
    with ray_session(num_workers, ray_address) as ray:
        gpu_tasks = dev.type == "cuda" and cluster_has_gpus(ray)
        yield RayMapper(ray, "cuda" if gpu_tasks else "cpu")


def _run_layers(model, windows, dev, store: LayerStore, settings: AwqSettings, out_dtype, mapper) -> None:
    layers = hf_model.decoder_layers(model)
    last = max(i for i in range(len(layers)) if not store.done(i))
    inps, kwargs = first_layer_inputs(model, windows, dev)
    positions = sample_positions(windows.shape[1], windows.shape[0], SEARCH_TOKENS)
    for i in tqdm(range(last + 1), desc="auto_awq layers"):
        layer = layers[i].to(dev)
        if store.done(i):
            inps = layer_forward(layer, inps, kwargs)
        else:
            recorder = FeatureRecorder(layer, positions)
            try:
                outs = layer_forward(layer, inps, kwargs)
            finally:
                recorder.remove()
            tensors = awq_layer.quantize_layer(layer, recorder.finish(), f"model.layers.{i}", settings, out_dtype, mapper)
            store.save(i, tensors)
            inps = outs
        layers[i].cpu()


def auto_awq(
    model_path: str,
    work_dir: str,
    w_bits: int = 4,
    w_group_size: int = 128,
    calib_dataset: str = "c4",
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    search_scale: bool = True,
    clip: bool = False,
    num_workers: int = 1,
    ray_address: str | None = None,
    device: str = "auto",
) -> str:
    """Quantize ``model_path`` with AWQ and write the AWQ checkpoint into ``work_dir``; returns it.

    ``search_scale=False`` is LMDeploy 0.1.0's fast mode (r = 0.5 on the
    activation absmax, no search); ``clip`` adds the clipping search.
    """
    _check_settings(w_bits, w_group_size, num_workers)
    config = hf_model.read_hf_config(model_path)
    hf_model.check_family(config, model_path)
    hf_model.check_float_checkpoint(config, model_path)
    dev = hf_model.resolve_device(device)
    model = hf_model.load_causal_lm(model_path, hf_model.compute_dtype(config, dev))
    _check_shapes(model, w_group_size)
    settings = AwqSettings(w_bits, w_group_size, search_scale, clip)
    n_layers = len(hf_model.decoder_layers(model))
    job = {
        "model": str(Path(model_path).resolve()), "w_bits": w_bits, "w_group_size": w_group_size,
        "calib_dataset": calib_dataset, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen,
        "search_scale": search_scale, "clip": clip, "num_layers": n_layers,
    }
    store = LayerStore(work_dir, job)
    out_dtype = hf_model.checkpoint_dtype(config)
    if not all(store.done(i) for i in range(n_layers)):
        tokenizer = hf_model.load_tokenizer(model_path)
        windows = calib_windows(load_calib_texts(calib_dataset), tokenizer, calib_samples, calib_seqlen)
        with _search_mapper(num_workers, ray_address, dev) as mapper:
            _run_layers(model, windows, dev, store, settings, out_dtype, mapper)
    layer_files = [store.path(i) for i in range(n_layers)]
    return write_awq_checkpoint(model, model_path, work_dir, layer_files, settings, config, out_dtype)
