"""`tpserve convert MODEL_NAME MODEL_PATH`: a Hugging Face model -> a workspace."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face model into a tpserve workspace",
        description="Convert a Hugging Face model (folder or hub id) into a workspace whose "
                    "weights are pre-split for --tp ranks. MODEL_NAME picks the chat template "
                    "(`tpserve list`; 'auto' = the tokenizer's own).")
    p.add_argument("model_name", help="chat template name, e.g. llama3, qwen-7b, internlm-chat-7b")
    p.add_argument("model_path", help="Hugging Face model folder or hub id")
    p.add_argument("--dst-path", default="./workspace", help="output folder (replaced when done)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to split for")
    p.add_argument("--model-format", default="hf", choices=("hf", "awq"),
                   help="hf: float weights; awq: a 4-bit AWQ checkpoint (e.g. from lite auto_awq)")
    p.add_argument("--group-size", type=int, default=0,
                   help="AWQ group size (checked against the checkpoint's)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="stored float type (auto: the checkpoint's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.convert import convert

    out = convert(args.model_name, args.model_path, args.dst_path, tp=args.tp,
                  model_format=args.model_format, group_size=args.group_size, dtype=args.dtype)
    print(f"workspace written to {out}")
    return 0
