"""`tpserve serve api_server | api_client | gradio`: the serving commands of the CLI.

`add_serve_parser(subparsers)` registers them; each sets `func` to its entry
function taking the parsed namespace. Flags are spelled with dashes; the CLI
accepts LMDeploy's underscores too (`--server_name`) by normalizing first.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from .cli import add_engine_flags, engine_options, str2bool
from .openai_api import DEFAULT_MAX_BODY_BYTES
from .serve_config import STRATEGIES, ServeConfig


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve a model over HTTP, or talk to a server")
    sub = serve.add_subparsers(dest="serve_command", metavar="{api_server,api_client,gradio}")
    sub.required = True
    _add_api_server(sub)
    _add_api_client(sub)
    _add_gradio(sub)
    return serve


def _add_api_server(sub: Any) -> None:
    p = sub.add_parser("api_server", help="OpenAI-compatible REST server (Ray Serve, or --no-ray)")
    p.add_argument("model_path", nargs="?", default=None,
                   help="a converted workspace or a Hugging Face model (default: the bundled demo model)")
    p.add_argument("--server-name", default="127.0.0.1", help="host to listen on (0.0.0.0 for all)")
    p.add_argument("--server-port", type=int, default=23333)
    p.add_argument("--instance-num", type=int, default=64,
                   help="requests batched at once (the engine's --max-batch-size)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the model's)")
    p.add_argument("--api-keys", nargs="+", default=None, help="accepted Bearer keys")
    p.add_argument("--allow-origins", nargs="+", default=None, help="CORS origins ('*' for any)")
    p.add_argument("--allow-credentials", type=str2bool, default=False)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start one)")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--placement-strategy", default="STRICT_PACK", choices=STRATEGIES)
    p.add_argument("--no-ray", action="store_true", help="serve in this process with uvicorn")
    p.add_argument("--log-level", default="info")
    add_engine_flags(p)  # --tp, --session-len, --cache-max-entry-count, --device, ...
    p.set_defaults(run=run_api_server)


def _add_api_client(sub: Any) -> None:
    p = sub.add_parser("api_client", help="terminal chat over a server's /v1/chat/interactive")
    p.add_argument("url", help="the server, e.g. http://localhost:23333")
    p.add_argument("--session-id", type=int, default=1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-output-len", type=int, default=512)
    p.set_defaults(run=run_api_client)


def _add_gradio(sub: Any) -> None:
    p = sub.add_parser("gradio", help="web chat page for a server (URL) or a local model")
    p.add_argument("url_or_model", nargs="?", default=None,
                   help="a server URL, or a model to serve here (default: the bundled demo model)")
    p.add_argument("--server-name", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=6006)
    p.add_argument("--restful-api", type=str2bool, default=None,
                   help="True: url_or_model is a server URL (default: guessed from http://)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (a local model)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--api-key", default=None)
    p.set_defaults(run=run_gradio)


def _placement_device(device: str | None) -> str:
    """The engine's --device (auto, cpu, cuda, cuda:1) as what a replica's bundles hold."""
    if device in (None, "auto"):
        return "auto"
    return "cpu" if device == "cpu" else "cuda"


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    options = engine_options(args)
    options.pop("tp", None)
    if args.dtype != "auto":
        options["dtype"] = args.dtype
    options.setdefault("max_batch_size", args.instance_num)
    return ServeConfig.from_args({
        "model": args.model_path, "model_name": args.model_name, "tp": args.tp,
        "instance_num": options["max_batch_size"], "num_replicas": args.num_replicas,
        "placement_strategy": args.placement_strategy, "device": _placement_device(args.device),
        "api_keys": args.api_keys or (), "allow_origins": args.allow_origins or (),
        "max_body_bytes": args.max_body_bytes, "engine_options": options,
    })


def run_api_server(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.no_ray:
        return _serve_without_ray(config, args)
    return _serve_with_ray(config, args)


def _serve_without_ray(config: ServeConfig, args: argparse.Namespace) -> int:
    from .deployment import load_factory
    from .local_server import serve_forever
    from .openai_api import build_api_app

    serving = load_factory(config.engine_factory)(config)
    app = build_api_app(serving, config.api_options(), shutdown_engine=True)
    print(f"tpserve: serving {serving.model_id} at http://{args.server_name}:{args.server_port}/v1",
          flush=True)
    serve_forever(app, args.server_name, args.server_port, args.log_level)
    return 0


def _serve_with_ray(config: ServeConfig, args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from .app import build_app_from_config
    from .serve_env import set_cluster_env

    if args.ray_address is None:
        set_cluster_env()
    ray.init(address=args.ray_address, namespace="serve", log_to_driver=True)
    # after ray.init (whose handlers it replaces): a SIGTERM while the app is still
    # deploying must stop it too, not be lost
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.server_name, "port": args.server_port})
        serve.run(build_app_from_config(config), name="tpserve", route_prefix="/")
        print(f"tpserve: serving {config.model_name or config.model or 'the demo model'} at "
              f"http://{args.server_name}:{args.server_port}/v1 (Ray Serve; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("tpserve: shutting down", file=sys.stderr, flush=True)
    finally:
        _stop_ray_app(joined=args.ray_address is not None)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; let the cleanup finish
    raise KeyboardInterrupt


def _stop_ray_app(joined: bool) -> None:
    import ray
    from ray import serve

    try:
        if joined:  # leave the cluster's other applications running
            serve.delete("tpserve")
        else:
            serve.shutdown()
    except (Exception, KeyboardInterrupt) as exc:  # still stop the Ray processes we started
        print(f"tpserve: Serve did not shut down cleanly: {exc!r}", file=sys.stderr)
    finally:
        ray.shutdown()


def run_api_client(args: argparse.Namespace) -> int:
    from .clients import api_client_repl

    api_client_repl(args.url, session_id=args.session_id, api_key=args.api_key,
                    request_output_len=args.request_output_len)
    return 0


def run_gradio(args: argparse.Namespace) -> int:
    from .webui import run_webui

    run_webui(args.url_or_model, server_name=args.server_name, server_port=args.server_port,
              restful_api=args.restful_api, tp=args.tp, model_name=args.model_name,
              api_key=args.api_key)
    return 0
