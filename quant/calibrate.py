"""`lite calibrate`: activation and KV statistics of a Hugging Face model on calibration text.

Files written to ``work_dir`` (``torch.load`` gives plain dicts of float32
tensors; the layout of LMDeploy 0.1.0, outer key the statistic)::

    inputs_stats.pth   {stat: {"model.layers.{i}.{self_attn|mlp}.{x}_proj": Tensor[in_features]}}
    outputs_stats.pth  {stat: {"model.layers.{i}.{self_attn|mlp}.{x}_proj": Tensor[out_features]}}
    key_stats.pth      {stat: {i: Tensor[kv_heads, head_dim]}}   # i = layer index (int)
    value_stats.pth    {stat: {i: Tensor[kv_heads, head_dim]}}

where ``stat`` is one of ``max, min, absmax, mean, absmean``, taken per
channel over every calibration token. Inputs/outputs cover every ``nn.Linear``
inside the decoder layers. Keys are recorded after rotary embedding, as the
KV cache holds them (see ``kv_capture``); values are the ``v_proj`` output.

The windows can be split over Ray tasks (one GPU each on a GPU cluster, else
one CPU each); every task loads the model from ``model_path`` (a path all
nodes can read) and returns its statistics, which merge exactly.
"""

import os
from pathlib import Path

import torch
from tqdm import tqdm

from tpserve.engine.errors import ConfigError
from tpserve.quant import hf_model
from tpserve.quant.datasets import calib_windows, load_calib_texts
from tpserve.quant.kv_capture import per_head_rows, record_kv
from tpserve.quant.observers import ChannelStats, export_stat_map, merge_stat_maps
from tpserve.quant.ray_tasks import cluster_has_gpus, ray_session, run_remote, split_evenly, task_options

STATS_FILES = {
    "inputs": "inputs_stats.pth",
    "outputs": "outputs_stats.pth",
    "key": "key_stats.pth",
    "value": "value_stats.pth",
}


def _linear_hooks(model, maps: dict) -> list:
    handles = []
    for i, layer in enumerate(hf_model.decoder_layers(model)):
        for rel, linear in hf_model.layer_linears(layer).items():
            name = f"model.layers.{i}.{rel}"
            maps["inputs"][name] = ChannelStats()
            maps["outputs"][name] = ChannelStats()

            def hook(_m, args, out, name=name):
                maps["inputs"][name].update(args[0])
                maps["outputs"][name].update(out)

            handles.append(linear.register_forward_hook(hook))
    return handles


def _kv_callback(maps: dict):
    def record(layer_idx: int, key, value):
        for kind, x in (("key", key), ("value", value)):
            stats = maps[kind].setdefault(layer_idx, ChannelStats(channel_dims=2))
            stats.update(per_head_rows(x))

    return record


@torch.no_grad()
def collect_stats(model_path: str, windows: torch.Tensor, device: str, progress: bool = False) -> dict:
    """``{"inputs"|"outputs"|"key"|"value": {key: ChannelStats}}`` over ``windows [n, seqlen]``."""
    dev = hf_model.resolve_device(device)
    dtype = hf_model.compute_dtype(hf_model.read_hf_config(model_path), dev)
    model = hf_model.load_causal_lm(model_path, dtype).to(dev)
    maps = {kind: {} for kind in STATS_FILES}
    handles = _linear_hooks(model, maps)
    try:
        with record_kv(model, _kv_callback(maps)):
            for ids in tqdm(windows, desc="calibrate", disable=not progress):
                # The decoder stack alone: the LM head's logits are not needed.
                model.model(input_ids=ids[None].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maps


def _collect_with_ray(model_path, windows, num_workers, ray_address, device) -> list[dict]:
    with ray_session(num_workers, ray_address) as ray:
        has_gpus = cluster_has_gpus(ray)
        if device == "cuda" and not has_gpus:
            raise ConfigError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu")
        want_gpu = device != "cpu" and has_gpus
        shards = [(model_path, windows[list(r)], "cuda" if want_gpu else "cpu")
                  for r in split_evenly(len(windows), num_workers)]
        return run_remote(ray, collect_stats, shards, task_options(want_gpu))


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def calibrate(
    model_path: str,
    dataset: str,
    n_samples: int,
    seqlen: int,
    work_dir: str,
    num_workers: int = 1,
    ray_address: str | None = None,
    device: str = "auto",
) -> str:
    """Record the statistics described in the module docstring; returns ``work_dir``.

    ``dataset`` is c4 | wikitext2 | ptb | pileval or a local file/folder.
    ``num_workers=1`` without ``ray_address`` runs in this process.
    """
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {num_workers}")
    config = hf_model.read_hf_config(model_path)
    hf_model.check_family(config, model_path)
    hf_model.check_float_checkpoint(config, model_path)
    tokenizer = hf_model.load_tokenizer(model_path)
    windows = calib_windows(load_calib_texts(dataset), tokenizer, n_samples, seqlen)
    if num_workers == 1 and not ray_address:
        maps = collect_stats(model_path, windows, device, progress=True)
    else:
        parts = _collect_with_ray(model_path, windows, num_workers, ray_address, device)
        maps = {kind: merge_stat_maps([p[kind] for p in parts]) for kind in STATS_FILES}
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind, filename in STATS_FILES.items():
        save_atomic(export_stat_map(maps[kind]), out / filename)
    return str(out)
