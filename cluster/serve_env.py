"""The Ray Serve settings tpserve serves with, and what each one saves.

Measured with scripts/bench_serving_transport.py: a fake engine streaming a
token every 5 ms to 16 concurrent clients, on a 2-core CPU box.

- REPLICA_ENV goes into each replica actor's runtime_env (placement.py). Serve
  runs a replica's code on an event loop of its own by default, so each streamed
  chunk crossed threads on its way out: TPOT through Serve was 1.07-1.10x the
  in-process server's, and 1.00-1.02x with the code on the replica's main loop.
- CLUSTER_ENV must reach the HTTP proxies, which start with Ray on each node:
  `tpserve serve api_server` sets it for the Ray it starts, and the `ray up`
  configs put it before `ray start`. The proxies then talk to replicas over gRPC
  instead of Ray actor calls, which took a further ~25 ms off TTFT.
"""
from __future__ import annotations

import os

REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
CLUSTER_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def set_cluster_env() -> None:
    """For a Ray this process is about to start: its processes inherit our environment.
    A value the user set already wins."""
    for key, value in CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
