"""The `tpserve` command: LMDeploy 0.1.0's commands, spelled as there.

Flags are accepted with dashes or underscores (`--dst-path`, `--dst_path`),
boolean values as True/False/true/false/1/0, and `chat turbomind PATH` as
`chat PATH` ("turbomind" named LMDeploy's engine; here it means tpserve's).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Callable, Sequence

from ..engine.errors import TpserveError


def str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--dst_path=x` -> `--dst-path=x`; flag values are left alone."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Runtime knobs shared by chat, serve and the Python API (EngineConfig)."""
    g = p.add_argument_group("engine")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: the "
                   "workspace's; 1 for a Hugging Face model)")
    g.add_argument("--session-len", type=int, default=None, help="max tokens of one session")
    g.add_argument("--max-batch-size", type=int, default=None, help="requests run at once")
    g.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="KV cache size: fraction of free GPU memory (< 1) or a block count (>= 1)")
    g.add_argument("--cache-block-seq-len", type=int, default=None, help="tokens per KV block")
    g.add_argument("--quant-policy", type=int, default=None, choices=(0, 4, 8),
                   help="8 (or LMDeploy's 4): int8 KV cache; 0: off")
    g.add_argument("--eager-mode", type=str2bool, nargs="?", const=True, default=None,
                   help="run without CUDA graphs (slower; for debugging)")
    g.add_argument("--async-scheduling", type=str2bool, nargs="?", const=True, default=None,
                   help="schedule each step while the previous one runs (default: True)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")


def engine_options(args: argparse.Namespace) -> dict:
    keys = ("session_len", "max_batch_size", "cache_max_entry_count", "cache_block_seq_len",
            "quant_policy", "eager_mode", "async_scheduling", "device")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from . import chat_cli, convert_cli, env_cli, serve_cli

    parser = argparse.ArgumentParser(
        prog="tpserve", description="Compress and serve LLMs, on one box or a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registrars: list[Callable] = [convert_cli.add_parser, chat_cli.add_parser,
                                  env_cli.add_list_parser, env_cli.add_check_env_parser,
                                  serve_cli.add_serve_parser]
    if importlib.util.find_spec(f"{__package__}.lite_cli") is not None:
        registrars.append(importlib.import_module(f"{__package__}.lite_cli").add_parser)
    for register in registrars:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.run(args) or 0)
    except TpserveError as exc:
        print(f"tpserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
