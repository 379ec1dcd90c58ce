"""`tpserve list` (chat template names) and `tpserve check_env`."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform


def add_list_parser(sub) -> None:
    p = sub.add_parser("list", help="list the model names (chat templates) convert accepts")
    p.set_defaults(run=run_list)


def run_list(args: argparse.Namespace) -> int:
    from ..engine.chat_template import template_names

    print("Supported model names:")
    for name in template_names():
        print(f"  {name}")
    return 0


def add_check_env_parser(sub) -> None:
    p = sub.add_parser("check_env", aliases=["check-env"], help="print versions and devices")
    p.set_defaults(run=run_check_env)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_check_env(args: argparse.Namespace) -> int:
    import torch

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows += [(p, _version(p)) for p in ("tpserve", "torch", "triton", "transformers", "ray",
                                        "safetensors", "tokenizers", "starlette", "datasets")]
    rows.append(("cuda", torch.version.cuda or "none"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows.append(("gpus", str(count)))
    rows += [(f"gpu {i}", torch.cuda.get_device_name(i)) for i in range(count)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
