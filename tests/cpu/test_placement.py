"""Deployment options are a pure function of the serving config."""
from __future__ import annotations

import pytest

from tpserve.cluster.placement import deployment_options, placement_for
from tpserve.cluster.serve_config import ServeConfig
from tpserve.engine.errors import ConfigError


@pytest.mark.parametrize("tp, bundles", [
    (1, [{"CPU": 1, "GPU": 1}]),
    (2, [{"CPU": 1}, {"GPU": 1}, {"GPU": 1}]),
    (4, [{"CPU": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]),
])
def test_gpu_bundles(tp, bundles):
    assert placement_for(tp) == {"placement_group_bundles": bundles,
                                 "placement_group_strategy": "STRICT_PACK"}


def test_cpu_bundles_strategy_and_cpus():
    p = placement_for(3, strategy="PACK", cpus_per_replica=2, device="cpu")
    assert p == {"placement_group_bundles": [{"CPU": 2}, {"CPU": 1}, {"CPU": 1}, {"CPU": 1}],
                 "placement_group_strategy": "PACK"}


@pytest.mark.parametrize("kwargs, word", [
    ({"tp": 0}, "tp"), ({"tp": 2, "strategy": "TIGHT"}, "STRICT_PACK"),
    ({"tp": 1, "cpus_per_replica": 0}, "cpus_per_replica"),
])
def test_bad_placement(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        placement_for(**kwargs)


def test_deployment_options_pass_through():
    config = ServeConfig(model="m", tp=2, num_replicas=3, max_ongoing_requests=99)
    opts = deployment_options(config, "cuda")
    assert opts["num_replicas"] == 3 and opts["max_ongoing_requests"] == 99
    # tp > 1: every rank is its own GPU actor; the replica holds no GPU
    assert opts["ray_actor_options"] == {
        "num_cpus": 1.0, "num_gpus": 0,
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    assert len(opts["placement_group_bundles"]) == 3 and "autoscaling_config" not in opts
    single = deployment_options(ServeConfig(model="m", tp=1), "cuda")
    assert single["ray_actor_options"]["num_gpus"] == 1
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    opts = deployment_options(ServeConfig(model="m", autoscaling_config=auto), "cpu")
    assert opts["autoscaling_config"] == auto and "num_replicas" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 0


def test_deployment_options_are_accepted_by_serve():
    from ray import serve

    from tpserve.cluster.deployment import TpserveDeployment

    opts = deployment_options(ServeConfig(model="m", tp=2, placement_strategy="PACK"), "cuda")
    d = serve.deployment(TpserveDeployment).options(**opts)
    assert d.num_replicas == 1 and d.max_ongoing_requests == 256


def test_serve_config_from_string_args():
    c = ServeConfig.from_args({"model": "ws", "tp": "2", "api_keys": "a,b", "instance-num": "8",
                               "session_len": "4096", "cache_max_entry_count": "0.8",
                               "enable_prefix_caching": "False", "device": "cpu"})
    assert c.tp == 2 and c.instance_num == 8 and c.api_keys == ("a", "b") and c.device == "cpu"
    assert c.engine_options == {"session_len": 4096, "cache_max_entry_count": 0.8,
                                "enable_prefix_caching": False}
    with pytest.raises(ConfigError, match="tp"):
        ServeConfig.from_args({"model": "ws", "tp": "0"})
    with pytest.raises(ConfigError, match="number"):
        ServeConfig.from_args({"model": "ws", "tp": "two"})
    with pytest.raises(ConfigError, match="device"):
        ServeConfig.from_args({"model": "ws", "device": "tpu"})
    from tpserve.engine.config import EngineConfig  # a word that is no bool: no silent truth
    options = ServeConfig.from_args({"model": "ws", "async_scheduling": "yes"}).engine_options
    with pytest.raises(ConfigError, match="--async-scheduling must be true or false, got 'yes'"):
        EngineConfig.from_options(options)
