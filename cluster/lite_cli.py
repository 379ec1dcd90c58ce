"""`tpserve lite calibrate | kv_qparams | auto_awq | ppl`: the quantization jobs."""
from __future__ import annotations

import argparse

from .cli import str2bool


def add_parser(sub) -> None:
    lite = sub.add_parser("lite", help="quantization: calibrate, kv_qparams, auto_awq, ppl")
    jobs = lite.add_subparsers(dest="lite_command", required=True, metavar="JOB")

    p = jobs.add_parser("calibrate", help="record activation and KV statistics of a model")
    _calib_flags(p)
    p.set_defaults(run=run_calibrate)

    p = jobs.add_parser("kv_qparams", help="int8 KV scales/zero points per layer and tp rank, "
                        "written into a workspace")
    p.add_argument("--work-dir", default="./quant_output", help="where calibrate wrote its stats")
    p.add_argument("--turbomind-dir", required=True,
                   help="the workspace, or its weights folder (workspace/triton_models/weights/)")
    p.add_argument("--kv-sym", type=str2bool, nargs="?", const=True, default=False,
                   help="symmetric (absmax/127) instead of asymmetric (min/max) parameters")
    p.add_argument("--num-tp", type=int, default=None, help="must equal the workspace's tp")
    p.add_argument("--kv-bits", type=int, default=8, choices=(8,))
    p.set_defaults(run=run_kv_qparams)

    p = jobs.add_parser("auto_awq", help="4-bit AWQ: write a Hugging Face AWQ checkpoint")
    _calib_flags(p)
    p.add_argument("--w-bits", type=int, default=4, choices=(4,))
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--w-method", default="awq", choices=("awq", "rtn"),
                   help="awq: activation-aware scales (and --clip) from the calibration data; "
                        "rtn: plain group-wise round-to-nearest of the weights as they are (no "
                        "calibration data, no scales, no clipping), the baseline AWQ improves on. "
                        "Both write the same checkpoint format")
    p.add_argument("--search-scale", type=str2bool, nargs="?", const=True, default=True,
                   help="search the AWQ ratio grid (False: LMDeploy 0.1.0's fixed exponent 0.5)")
    p.add_argument("--clip", type=str2bool, nargs="?", const=True, default=False,
                   help="also search per-group clipping")
    p.add_argument("--eval-ppl", type=str2bool, nargs="?", const=True, default=True,
                   help="print float vs 4-bit perplexity on the last tenth of the calibration "
                        "documents, which calibration never sees (False: skip it)")
    p.set_defaults(run=run_auto_awq)

    p = jobs.add_parser("ppl", help="perplexity of a model or workspace on a dataset")
    p.add_argument("model", nargs="?", default=None, help="workspace or HF model (default: bundled)")
    p.add_argument("--dataset", default=None,
                   help="c4 | wikitext2 | ptb | pileval | a local text file or folder "
                        "(default: the bundled model's held-out text)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=16, help="windows at most")
    p.add_argument("--quant-policy", type=int, default=0, choices=(0, 4, 8))
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_ppl)


def _calib_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model folder or hub id "
                   "(default: the bundled model)")
    p.add_argument("--calib-dataset", default="c4",
                   help="c4 | wikitext2 | ptb | pileval, or a local .txt/.jsonl/.json/.parquet "
                        "file or folder (works offline)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--work-dir", default="./quant_output")
    p.add_argument("--num-workers", type=int, default=1, help="Ray workers (one per GPU)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster")
    p.add_argument("--device", default="auto")


def _model(path: str | None) -> str:
    if path is not None:
        return path
    from ..engine.demo_model import demo_model_path

    return str(demo_model_path())


def run_calibrate(args: argparse.Namespace) -> int:
    from ..quant.calibrate import calibrate

    out = calibrate(_model(args.model), args.calib_dataset, args.calib_samples, args.calib_seqlen,
                    args.work_dir, num_workers=args.num_workers, ray_address=args.ray_address,
                    device=args.device)
    print(f"statistics written to {out}")
    return 0


def run_kv_qparams(args: argparse.Namespace) -> int:
    from ..engine.errors import ConfigError
    from ..engine.loader import write_kv_qparams
    from ..engine.workspace import read_meta, resolve_workspace
    from ..quant.kv_qparams import compute_kv_qparams, load_kv_stats

    ws = resolve_workspace(args.turbomind_dir)
    meta = read_meta(ws)
    num_tp = meta.tp if args.num_tp is None else args.num_tp
    if num_tp != meta.tp:
        raise ConfigError(f"--num-tp {num_tp} does not match the workspace, which was converted "
                          f"for tp={meta.tp}; pass --num-tp {meta.tp}")
    keys, values = load_kv_stats(args.work_dir)
    try:
        params = compute_kv_qparams(keys, values, num_tp, symmetric=args.kv_sym, bits=args.kv_bits)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len({layer for layer, _ in params}) != meta.model.num_layers:
        raise ConfigError(f"the statistics in {args.work_dir} do not match this workspace's "
                          f"{meta.model.num_layers} layers; calibrate the same model")
    write_kv_qparams(ws, params)
    print(f"int8 KV parameters written into {ws} for {meta.tp} rank(s); serve or chat with "
          f"--quant-policy 8 to use them")
    return 0


def run_auto_awq(args: argparse.Namespace) -> int:
    from ..quant.awq import auto_awq

    out = auto_awq(_model(args.model), args.work_dir, w_bits=args.w_bits,
                   w_group_size=args.w_group_size, calib_dataset=args.calib_dataset,
                   calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                   search_scale=args.search_scale, clip=args.clip, num_workers=args.num_workers,
                   ray_address=args.ray_address, device=args.device, w_method=args.w_method,
                   eval_ppl=args.eval_ppl)
    kind = "AWQ" if args.w_method == "awq" else "round-to-nearest"
    print(f"{kind} 4-bit checkpoint written to {out}; next: tpserve convert MODEL_NAME {out} "
          f"--model-format awq --group-size {args.w_group_size}")
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from ..engine.perplexity import engine_perplexity

    value = engine_perplexity(args.model, args.dataset, args.seqlen, args.samples,
                              quant_policy=args.quant_policy, device=args.device)
    print(f"perplexity: {value:.3f}")
    return 0
