"""Perplexity of the quantization modes on one evaluation slice: fp, W4 round-to-nearest,
W4 AWQ, int8 KV (calibrated and online) and AWQ + int8 KV.

    python scripts/quant_quality.py                       # the bundled model, CPU or GPU
    python scripts/quant_quality.py --model ./my-hf-model --text corpus.txt --json quality.json

Every step runs the `tpserve` commands a user types (`convert`, `lite calibrate`,
`lite kv_qparams`, `lite auto_awq`, `convert --model-format awq`, `lite ppl`), in
this process. The text (default: the bundled model's held-out text, which it
never saw in training) is split by documents (blank-line separated) into a
calibration half and an evaluation half, so nothing is calibrated on the text
it is scored on. Prints a markdown table and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO = "tpserve-demo"


@dataclass(frozen=True)
class Row:
    config: str
    w_bits: int
    kv_bits: int
    ppl: float
    delta: float  # relative to fp


def split_text(text: str) -> tuple[list[str], str]:
    """(calibration documents, evaluation text): the documents before the middle character
    go to calibration, the rest (joined as they were) to evaluation."""
    docs = [d for d in text.split("\n\n") if d.strip()]
    half, size = len(text) / 2, 0
    for cut, doc in enumerate(docs):
        size += len(doc) + 2
        if size >= half:
            break
    cut = max(1, min(cut, len(docs) - 1))
    return docs[:cut], "\n\n".join(docs[cut:])


def write_halves(text: str, folder: Path) -> tuple[Path, Path]:
    calib, evaluation = split_text(text)
    calib_file, eval_file = folder / "calib.jsonl", folder / "eval.jsonl"
    calib_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in calib), encoding="utf-8")
    eval_file.write_text(json.dumps({"text": evaluation}) + "\n", encoding="utf-8")
    return calib_file, eval_file


def tpserve(*argv: str) -> str:
    """Run one tpserve command in this process; its stdout (also echoed)."""
    from tpserve.cluster.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    sys.stdout.write(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"`tpserve {' '.join(argv)}` failed (exit {rc})")
    return buf.getvalue()


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path, calib: Path, evaluation: Path):
        self.args, self.work, self.calib, self.eval = args, work, calib, evaluation

    def ppl(self, workspace: Path, quant_policy: int) -> float:
        out = tpserve("lite", "ppl", str(workspace), "--dataset", str(self.eval), "--seqlen",
                      str(self.args.seqlen), "--samples", str(self.args.samples), "--quant-policy",
                      str(quant_policy), "--device", self.args.device)
        return float(re.search(r"perplexity: ([0-9.]+)", out).group(1))

    def calib_flags(self) -> list[str]:
        a = self.args
        return ["--calib_dataset", str(self.calib), "--calib_samples", str(a.calib_samples),
                "--calib_seqlen", str(a.seqlen), "--device", a.device]

    def convert(self, name: str, source: str, awq: bool = False) -> Path:
        dst = self.work / name
        extra = ["--model-format", "awq", "--group-size", str(self.args.group_size)] if awq else []
        tpserve("convert", "auto", source, "--dst_path", str(dst), *extra)
        return dst

    def w4(self, method: str, clip: bool = False) -> Path:
        name = method + ("_clip" if clip else "")
        out = self.work / f"{name}_output"
        tpserve("lite", "auto_awq", "--model", self.args.model, "--w_bits", "4", "--w_group_size",
                str(self.args.group_size), "--w-method", method, "--clip", str(clip),
                "--work_dir", str(out), *self.calib_flags())
        return self.convert(f"workspace_{name}", str(out), awq=True)

    def kv_qparams(self, workspace: Path, stats: Path) -> None:
        tpserve("lite", "kv_qparams", "--work_dir", str(stats), "--turbomind_dir",
                str(workspace / "triton_models" / "weights"), "--kv_sym", "False", "--num_tp", "1")


def run_all(args: argparse.Namespace, work: Path) -> list[tuple[str, int, int, float]]:
    calib, evaluation = write_halves(Path(args.text).read_text(encoding="utf-8"), work)
    r = Runner(args, work, calib, evaluation)
    stats = work / "quant_output"
    tpserve("lite", "calibrate", "--model", args.model, "--work_dir", str(stats), *r.calib_flags())
    fp_ws = r.convert("workspace", args.model)
    rows = [("fp", 16, 16, r.ppl(fp_ws, 0)),
            ("int8 KV, online scales", 16, 8, r.ppl(fp_ws, 8))]  # no kv_qparams yet: online
    r.kv_qparams(fp_ws, stats)
    rows.append(("int8 KV, calibrated (kv_qparams)", 16, 8, r.ppl(fp_ws, 8)))
    g = args.group_size
    rows.append((f"W4 round-to-nearest g{g}", 4, 16, r.ppl(r.w4("rtn"), 0)))
    awq_ws = r.w4("awq")
    rows.append((f"W4 AWQ g{g} (scale search)", 4, 16, r.ppl(awq_ws, 0)))
    if args.clip:
        rows.append((f"W4 AWQ g{g} (scale + clip search)", 4, 16, r.ppl(r.w4("awq", clip=True), 0)))
    r.kv_qparams(awq_ws, stats)
    rows.append((f"W4 AWQ g{g} (scale search) + int8 KV, calibrated", 4, 8, r.ppl(awq_ws, 8)))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| config | weight bits | KV bits | perplexity | vs fp |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.config} | {row.w_bits} | {row.kv_bits} | {row.ppl:.3f} | "
                     f"{100 * row.delta:+.2f}% |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEMO, help=f"Hugging Face model folder ({DEMO}: the bundled one)")
    p.add_argument("--text", default=None, help="plain text, documents separated by blank lines "
                   "(default: the bundled model's held-out text)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (calibration and evaluation)")
    p.add_argument("--samples", type=int, default=16, help="evaluation windows")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size")
    p.add_argument("--clip", type=lambda s: s.lower() in ("true", "1", "yes"), default=True,
                   help="add a row for AWQ with the clipping search too (True/False)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--work-dir", default=None, help="keep the workspaces here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.model == DEMO or args.text is None:
        from tpserve.engine.demo_model import demo_model_path

        if args.model == DEMO:
            args.model = str(demo_model_path())
        if args.text is None:
            args.text = str(demo_model_path() / "heldout.txt")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="tpserve-quality-")))
        work.mkdir(parents=True, exist_ok=True)
        raw = run_all(args, work)
    fp = raw[0][3]
    rows = [Row(name, w, kv, ppl, ppl / fp - 1) for name, w, kv, ppl in raw]
    seconds = time.time() - start
    by_name = {row.config: row.ppl for row in rows}
    rtn = by_name[f"W4 round-to-nearest g{args.group_size}"]
    awq = by_name[f"W4 AWQ g{args.group_size} (scale search)"]
    print(f"\nperplexity on {args.samples} windows of {args.seqlen} tokens of the evaluation half; "
          f"calibration: {args.calib_samples} windows of the other half ({seconds:.0f} s)\n")
    print(table(rows))
    print(f"\nAWQ {'is not worse than' if awq <= rtn else 'is WORSE than'} round-to-nearest "
          f"({awq:.3f} vs {rtn:.3f})")
    if args.json:
        result = {"model": args.model, "seqlen": args.seqlen, "samples": args.samples,
                  "calib_samples": args.calib_samples, "group_size": args.group_size,
                  "clip": args.clip, "device": args.device, "seconds": round(seconds, 1),
                  "awq_not_worse_than_rtn": awq <= rtn, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
