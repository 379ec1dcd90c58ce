"""Running the calibration work as Ray tasks: session setup and task resources."""

import contextlib
from typing import Callable, Sequence

from tpserve.engine.errors import ConfigError


@contextlib.contextmanager
def ray_session(num_workers: int, ray_address: str | None):
    """Connect to ``ray_address`` or start a local Ray with ``num_workers`` CPUs.

    A Ray that is already initialised is used as is. Only a Ray started here is
    shut down on exit.
    """
    import ray

    started = False
    if not ray.is_initialized():
        try:
            if ray_address:
                ray.init(address=ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise ConfigError(
                f"cannot connect to Ray at {ray_address!r} ({e}); start the cluster with "
                "`ray start --head` or leave --ray-address unset for a local Ray"
            ) from e
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def task_options(want_gpu: bool) -> dict:
    """One whole GPU per task when the job runs on GPUs, else one CPU."""
    return {"num_gpus": 1, "num_cpus": 1} if want_gpu else {"num_cpus": 1}


def cluster_has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def split_evenly(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous non-empty pieces (fewer when n < parts)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def run_remote(ray, fn: Callable, arg_lists: Sequence[tuple], options: dict) -> list:
    """``[fn(*args) for args in arg_lists]`` as Ray tasks, results in order."""
    remote = ray.remote(fn).options(**options)
    return ray.get([remote.remote(*args) for args in arg_lists])


def to_device(obj, device):
    """Tensors inside tuples, lists, dicts and dataclasses moved to ``device``; objects
    with a ``moved_to(device)`` method (the AWQ search blocks) give a moved copy."""
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if hasattr(obj, "moved_to"):
        return obj.moved_to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    return obj


def _call_on_device(device: str, fn: Callable, *args):
    return to_device(fn(*to_device(args, device)), "cpu")


class RayMapper:
    """``mapper(fn, arg_lists)`` running each call as a Ray task on ``device`` ("cuda" or "cpu")."""

    def __init__(self, ray, device: str):
        self.ray = ray
        self.device = device
        self.options = task_options(device == "cuda")

    def __call__(self, fn: Callable, arg_lists: Sequence[tuple]) -> list:
        remote = self.ray.remote(_call_on_device).options(**self.options)
        refs = [remote.remote(self.device, fn, *to_device(args, "cpu")) for args in arg_lists]
        return self.ray.get(refs)
