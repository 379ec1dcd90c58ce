"""`lite auto_awq`: 4-bit weight quantization of a Hugging Face model, AWQ or round-to-nearest.

With ``w_method="awq"`` the decoder layers are processed in order. Layer
``i`` sees the hidden states the full-precision model produces at its input
on the calibration windows (as in AutoAWQ: folding scales does not change a
layer's float output, and its output is taken before clipping). For each
layer: record the inputs of its linears, search the AWQ scales
(``awq_search``), fold them into the preceding norms/linears, optionally
search weight clipping, quantize every linear group-wise and save the layer's
checkpoint tensors under ``work_dir/awq_layers/``. ``w_method="rtn"`` skips
the calibration and quantizes the weights as they are (plain group-wise
round-to-nearest), the baseline AWQ is measured against.

A re-run with the same ``work_dir`` and settings skips finished layers (it
only replays their float forward). At the end the Hugging Face AWQ checkpoint
is written into ``work_dir`` (``awq_export``); ``awq_layers/`` may then be
deleted. Then, unless ``eval_ppl=False``, the float and the quantized model's
perplexity on calibration documents held out of the calibration
(``awq_eval``) are printed.

The searches of one layer's four linear groups are independent: with
``num_workers > 1`` (or a ``ray_address``) they run as Ray tasks.
"""

import contextlib
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tpserve.engine.errors import ConfigError
from tpserve.quant import awq_layer, hf_model
from tpserve.quant.awq_eval import heldout_perplexity, heldout_windows, split_heldout
from tpserve.quant.awq_export import write_awq_checkpoint
from tpserve.quant.awq_layer import AwqSettings, FeatureRecorder, layer_tensors, sample_positions
from tpserve.quant.datasets import calib_windows, load_calib_texts
from tpserve.quant.layer_stream import first_layer_inputs, layer_forward
from tpserve.quant.layer_store import LayerStore
from tpserve.quant.pack import PACK_FACTOR
from tpserve.quant.ray_tasks import RayMapper, cluster_has_gpus, ray_session

__all__ = ["auto_awq", "first_layer_inputs", "layer_forward", "W_METHODS"]

SEARCH_TOKENS = 8192  # calibration tokens (sampled evenly per window) that feed the searches
ATTENTION_SEARCH_TOKENS = 4096  # whole windows (at least one) that judge the q/k/v scales
W_METHODS = ("awq", "rtn")


def _check_settings(w_bits: int, w_group_size: int, num_workers: int, w_method: str, clip: bool) -> None:
    if w_bits != 4:
        raise ConfigError(f"--w-bits {w_bits} is not supported; the AWQ GEMM format stores 4-bit weights")
    if w_group_size <= 0:
        raise ConfigError(f"--w-group-size must be positive, got {w_group_size}")
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {num_workers}")
    if w_method not in W_METHODS:
        raise ConfigError(f"--w-method must be one of {', '.join(W_METHODS)}, got {w_method!r}")
    if w_method == "rtn" and clip:
        raise ConfigError("--clip searches clipping with calibration data; it needs --w-method awq")


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
            n_windows = max(1, ATTENTION_SEARCH_TOKENS // inps.shape[1])
            tensors = awq_layer.quantize_layer(layer, recorder.finish(), f"model.layers.{i}", settings,
                                               out_dtype, mapper, (inps[:n_windows], kwargs))
            store.save(i, tensors)
            inps = outs
        layers[i].cpu()


def _rtn_layers(model, dev, store: LayerStore, settings: AwqSettings, out_dtype) -> None:
    for i, layer in enumerate(tqdm(hf_model.decoder_layers(model), desc="rtn layers")):
        if not store.done(i):
            store.save(i, layer_tensors(layer.to(dev), f"model.layers.{i}", settings, out_dtype))
            layer.cpu()


def _report_heldout(model_path: str, texts: list[str] | None, calib_dataset: str, seqlen: int,
                    layer_files: list[Path], dev: torch.device, bits: int) -> None:
    """Print the held-out perplexity line, or why there is none."""
    if texts is None:
        try:
            texts = load_calib_texts(calib_dataset)
        except ConfigError as exc:
            print(f"held-out perplexity skipped: {exc}")
            return
    windows = heldout_windows(split_heldout(texts)[1], hf_model.load_tokenizer(model_path), seqlen)
    if windows is None:
        print(f"held-out perplexity skipped: the held-out calibration documents hold fewer than "
              f"{seqlen} tokens; use more calibration text or a smaller --calib-seqlen")
        return
    print(heldout_perplexity(model_path, layer_files, windows, dev).line(bits))


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
    w_method: str = "awq",
    eval_ppl: bool = True,
) -> str:
    """Quantize ``model_path`` and write the AWQ checkpoint into ``work_dir``; returns it.

    ``search_scale=False`` is LMDeploy 0.1.0's fast mode (r = 0.5 on the
    activation absmax, no search); ``clip`` adds the clipping search;
    ``w_method="rtn"`` is plain round-to-nearest (no scales, no clipping, no
    calibration data). The last tenth of the calibration documents is kept
    out of calibration; ``eval_ppl`` prints perplexity on it.
    """
    _check_settings(w_bits, w_group_size, num_workers, w_method, clip)
    config = hf_model.read_hf_config(model_path)
    hf_model.check_family(config, model_path)
    hf_model.check_float_checkpoint(config, model_path)
    dev = hf_model.resolve_device(device)
    model = hf_model.load_causal_lm(model_path, hf_model.compute_dtype(config, dev))
    _check_shapes(model, w_group_size)
    settings = AwqSettings(w_bits, w_group_size, search_scale, clip)
    n_layers = len(hf_model.decoder_layers(model))
    job = {
        "model": str(Path(model_path).resolve()), "w_method": w_method, "w_bits": w_bits,
        "w_group_size": w_group_size, "calib_dataset": calib_dataset, "calib_samples": calib_samples,
        "calib_seqlen": calib_seqlen, "search_scale": search_scale, "clip": clip, "num_layers": n_layers,
    }
    store = LayerStore(work_dir, job)
    out_dtype = hf_model.checkpoint_dtype(config)
    texts = None
    if w_method == "rtn":
        _rtn_layers(model, dev, store, settings, out_dtype)
    elif not all(store.done(i) for i in range(n_layers)):
        texts = load_calib_texts(calib_dataset)
        tokenizer = hf_model.load_tokenizer(model_path)
        windows = calib_windows(split_heldout(texts)[0], tokenizer, calib_samples, calib_seqlen)
        with _search_mapper(num_workers, ray_address, dev) as mapper:
            _run_layers(model, windows, dev, store, settings, out_dtype, mapper)
    layer_files = [store.path(i) for i in range(n_layers)]
    out = write_awq_checkpoint(model, model_path, work_dir, layer_files, settings, config, out_dtype)
    del model  # the held-out check loads a fresh float copy
    if eval_ppl:
        _report_heldout(model_path, texts, calib_dataset, calib_seqlen, layer_files, dev, w_bits)
    return out
