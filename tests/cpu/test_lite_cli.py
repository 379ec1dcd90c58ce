"""The tutorial's quantization commands, as written, on a tiny model with a
local calibration file; the quantized engines stay close to the float one."""
from __future__ import annotations

import math

import pytest

from tpserve.cluster.cli import main
from tpserve.engine.perplexity import engine_perplexity


@pytest.fixture(scope="module")
def flow(tiny_hf, tmp_path_factory):
    model, _ = tiny_hf("llama")
    root = tmp_path_factory.mktemp("lite")
    text = root / "calib.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. Hello world! " * 40 + "\n") * 20)
    return model, root, text


def test_calibrate_kv_qparams_then_int8_ppl(flow):
    model, root, text = flow
    ws, out = root / "workspace", root / "quant_output"
    assert main(["convert", "llama2", str(model), "--dst-path", str(ws)]) == 0
    assert main(["lite", "calibrate", "--model", str(model), "--calib_dataset", str(text),
                 "--calib_samples", "4", "--calib_seqlen", "64", "--work_dir", str(out)]) == 0
    assert main(["lite", "kv_qparams", "--work_dir", str(out), "--turbomind_dir",
                 str(ws / "triton_models" / "weights"), "--kv_sym", "False", "--num_tp", "1"]) == 0
    assert (ws / "weights" / "rank0" / "kv_qparams.safetensors").is_file()
    assert main(["lite", "kv_qparams", "--work-dir", str(out), "--turbomind-dir", str(ws),
                 "--num-tp", "2"]) == 2  # wrong tp: a clear error, not a traceback
    fp = engine_perplexity(str(ws), str(text), 64, 4, device="cpu")
    q8 = engine_perplexity(str(ws), str(text), 64, 4, quant_policy=8, device="cpu")
    assert math.isfinite(fp) and abs(q8 - fp) / fp < 0.05


def test_auto_awq_then_convert_awq(flow, tiny_hf):
    model, root, text = flow
    out, ws = root / "awq_output", root / "workspace_quant"
    assert main(["lite", "auto_awq", "--model", str(model), "--w_bits", "4", "--w_group_size",
                 "32", "--calib_dataset", str(text), "--calib_samples", "4", "--calib_seqlen",
                 "64", "--work_dir", str(out)]) == 0
    assert main(["convert", "llama2", str(out), "--model-format", "awq", "--group-size", "32",
                 "--dst_path", str(ws)]) == 0
    fp = engine_perplexity(str(model), str(text), 64, 4, device="cpu")
    q4 = engine_perplexity(str(ws), str(text), 64, 4, device="cpu")
    assert math.isfinite(q4) and abs(q4 - fp) / fp < 0.25
