"""`build_app`: the Ray Serve application of one model.

    serve run tpserve.cluster.app:build_app model=./workspace tp=2
    serve run tpserve/cluster/configs/serve.yaml     # import_path: tpserve.cluster.app:build_app

Any arg that is not a ServeConfig field is an engine option (session_len=...).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .deployment import TpserveDeployment
from .placement import deployment_options
from .serve_config import ServeConfig

DEPLOYMENT_NAME = "TpserveDeployment"


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" unless a connected Ray cluster (or, without Ray, this host) has no GPU."""
    if device != "auto":
        return device
    import ray

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    # `serve run` builds the app before connecting; a GPU-less head is normal there
    return "cuda"


def build_app(args: dict[str, Any]) -> Application:
    return build_app_from_config(ServeConfig.from_args(args))


def build_app_from_config(config: ServeConfig) -> Application:
    options = deployment_options(config, resolve_device(config.device))
    deployment = serve.deployment(TpserveDeployment, name=DEPLOYMENT_NAME)
    return deployment.options(**options).bind(config)
