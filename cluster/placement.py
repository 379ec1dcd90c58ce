"""Ray Serve deployment options as a pure function of the serving config.

A replica gets one placement group. With tp = 1 the replica runs the model
itself: one bundle with its CPUs and the GPU. With tp > 1 every rank is a Ray
actor of its own (rank 0 included, which keeps torch.distributed out of the
replica's process): bundle 0 holds the replica's CPUs, bundles 1..tp one GPU
each. STRICT_PACK keeps all ranks on one node (NCCL over NVLink); PACK lets
them spill over nodes.
"""
from __future__ import annotations

from typing import Any

from tpserve.engine.errors import ConfigError

from .serve_config import STRATEGIES, ServeConfig
from .serve_env import REPLICA_ENV


def placement_for(tp: int, strategy: str = "STRICT_PACK", cpus_per_replica: float = 1,
                  device: str = "cuda") -> dict[str, Any]:
    """Placement group bundles and strategy for one replica; device "cpu" uses CPU bundles."""
    if tp < 1:
        raise ConfigError(f"tp must be >= 1, got {tp}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"placement strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if cpus_per_replica <= 0:
        raise ConfigError(f"cpus_per_replica must be > 0, got {cpus_per_replica}")
    unit = {"CPU": 1} if device == "cpu" else {"GPU": 1}
    if tp == 1:
        bundles = [{"CPU": cpus_per_replica, **({} if device == "cpu" else unit)}]
    else:
        bundles = [{"CPU": cpus_per_replica}] + [dict(unit) for _ in range(tp)]
    return {"placement_group_bundles": bundles, "placement_group_strategy": strategy}


def deployment_options(config: ServeConfig, device: str) -> dict[str, Any]:
    """Keyword arguments for `Deployment.options(...)`; `device` is "cuda" or "cpu" (resolved)."""
    options: dict[str, Any] = placement_for(config.resolved_tp(), config.placement_strategy,
                                            config.cpus_per_replica, device)
    # the replica actor lives in bundle 0; it holds a GPU only when it runs the model itself
    runs_model = config.resolved_tp() == 1 and device != "cpu"
    options["ray_actor_options"] = {"num_cpus": config.cpus_per_replica,
                                    "num_gpus": 1 if runs_model else 0,
                                    "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    options["max_ongoing_requests"] = config.max_ongoing_requests
    if config.autoscaling_config:
        options["autoscaling_config"] = dict(config.autoscaling_config)
    else:
        options["num_replicas"] = config.num_replicas
    options["health_check_period_s"] = 10
    options["graceful_shutdown_timeout_s"] = 30
    return options
