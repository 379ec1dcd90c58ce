"""The shipped YAML configs load and pass Ray's own schemas; the serve CLI parses."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_serve_yaml_matches_serve_schema_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from tpserve.cluster.serve_config import ServeConfig

    schema = ServeDeploySchema.model_validate(load("serve.yaml"))
    app = schema.applications[0]
    assert app.import_path == "tpserve.cluster.app:build_app"
    assert app.deployments[0].name == "TpserveDeployment"
    config = ServeConfig.from_args(app.args)
    assert config.tp == 2 and config.engine_options["session_len"] == 4096


def test_build_app_from_serve_yaml_args():
    from ray.serve import Application

    from tpserve.cluster.app import build_app

    args = {**load("serve.yaml")["applications"][0]["args"], "device": "cpu"}
    assert isinstance(build_app(args), Application)


@pytest.mark.parametrize("name, provider", [("ray-local.yaml", "local"), ("ray-aws.yaml", "aws")])
def test_cluster_yaml_passes_ray_schema(name, provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    assert config["provider"]["type"] == provider
    assert any("pip install" in c and "tpserve" in c for c in config["setup_commands"])
    assert any("--num-gpus=0" in c for c in config["head_start_ray_commands"])
    validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["ray-local.yaml", "ray-aws.yaml"])
def test_every_ray_start_carries_the_serve_cluster_env(name):
    """The proxies start with Ray: the settings they need must precede `ray start`."""
    from tpserve.cluster.serve_env import CLUSTER_ENV

    config = load(name)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        for key, value in CLUSTER_ENV.items():
            assert f"{key}={value} ray start" in command, command


def test_set_cluster_env_keeps_what_the_user_set(monkeypatch):
    from tpserve.cluster.serve_env import CLUSTER_ENV, set_cluster_env

    (key, value), = CLUSTER_ENV.items()
    monkeypatch.delenv(key, raising=False)
    set_cluster_env()
    assert os.environ[key] == value
    monkeypatch.setenv(key, "0")
    set_cluster_env()
    assert os.environ[key] == "0"


def test_aws_head_has_no_gpu():
    config = load("ray-aws.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0


def test_serve_cli_flags():
    from tpserve.cluster.serve_cli import add_serve_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "api_server", "./workspace", "--server-name", "0.0.0.0",
                              "--server-port", "8000", "--instance-num", "32", "--tp", "2",
                              "--api-keys", "k1", "k2", "--session-len", "2048", "--device", "cpu",
                              "--async-scheduling", "False"])
    config = config_from_args(args)
    assert (config.tp, config.instance_num, config.api_keys) == (2, 32, ("k1", "k2"))
    assert config.engine_options == {"session_len": 2048, "max_batch_size": 32, "device": "cpu",
                                     "async_scheduling": False}
    assert args.server_port == 8000 and config.device == "cpu"
    args = parser.parse_args(["serve", "gradio", "http://h:23333", "--restful-api", "True"])
    assert args.restful_api is True and args.server_port == 6006
    args = parser.parse_args(["serve", "api_client", "http://h:23333", "--session-id", "3"])
    assert args.session_id == 3 and args.run.__name__ == "run_api_client"


def test_tpserve_cli_accepts_lmdeploy_spelling():
    from tpserve.cluster.cli import build_parser, normalize_argv
    from tpserve.cluster.serve_cli import config_from_args

    argv = ["serve", "api_server", "./workspace", "--server_name", "0.0.0.0", "--server_port",
            "23333", "--instance_num", "64", "--tp", "1"]
    args = build_parser().parse_args(normalize_argv(argv))
    assert args.server_name == "0.0.0.0" and args.run.__name__ == "run_api_server"
    assert config_from_args(args).instance_num == 64
    args = build_parser().parse_args(normalize_argv(
        ["serve", "gradio", "http://0.0.0.0:23333", "--server_name", "0.0.0.0", "--server_port",
         "6006", "--restful_api", "True"]))
    assert args.restful_api is True and args.server_port == 6006
