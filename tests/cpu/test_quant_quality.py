"""W4 quality on the bundled demo model: the round-to-nearest checkpoint is exactly group-wise
RTN (float64 reference), and AWQ, calibrated on one half of the held-out text, scores no worse
than RTN on the other half."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpserve.cluster.cli import main
from tpserve.engine.demo_model import demo_heldout_text, demo_model_path
from tpserve.quant import hf_model
from tpserve.quant.awq import auto_awq
from tpserve.quant.awq_eval import heldout_perplexity, heldout_windows, split_heldout
from tpserve.quant.quantize import dequantize_awq

GROUP = 128
SCRIPT = Path(__file__).parents[2] / "scripts" / "quant_quality.py"


def _script():
    spec = importlib.util.spec_from_file_location("quant_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quant_quality", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    calib, evaluation = _script().write_halves(demo_heldout_text(), root)
    return root, str(calib), json.loads(evaluation.read_text())["text"]


@pytest.fixture(scope="module")
def checkpoints(halves):
    root, calib, _ = halves
    model = str(demo_model_path())
    common = dict(w_group_size=GROUP, calib_dataset=calib, calib_samples=8, calib_seqlen=128,
                  device="cpu", eval_ppl=False)
    rtn = auto_awq(model, str(root / "rtn"), w_method="rtn", **common)
    awq = auto_awq(model, str(root / "awq"), **common)
    return model, Path(rtn), Path(awq)


def test_halves_partition_the_text(halves):
    _, calib, evaluation = halves
    docs = [json.loads(line)["text"] for line in Path(calib).read_text().splitlines()]
    whole = [d for d in demo_heldout_text().split("\n\n") if d.strip()]
    assert docs + evaluation.split("\n\n") == whole  # a partition: calibration first, in order
    assert abs(sum(len(d) + 2 for d in docs) - len(evaluation)) < 0.1 * len(evaluation)


def _rtn64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 group-wise asymmetric RTN of ``w [N, K]``, dequantized with fp16 scales as the
    checkpoint stores them; and a mask of the values within 1e-4 of a rounding tie."""
    n, k = w.shape
    g = w.double().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale) + zero).clamp(0, 15)
    deq = (q - zero) * scale.half().double()

    def near_tie(x):
        return ((x - x.floor()) - 0.5).abs() < 1e-4

    ties = near_tie(g / scale) | near_tie(-lo / scale)
    return deq.reshape(n, k), ties.reshape(n, k)


def test_rtn_checkpoint_is_groupwise_rtn(checkpoints):
    model, rtn, _ = checkpoints
    original = load_file(str(Path(model) / "model.safetensors"))
    got = load_file(str(rtn / "model.safetensors"))
    assert json.loads((rtn / "config.json").read_text())["quantization_config"]["group_size"] == GROUP
    linears = 0
    for key, t in got.items():
        if key.endswith(".qweight"):
            stem = key.removesuffix(".qweight")
            deq = dequantize_awq(t, got[f"{stem}.qzeros"], got[f"{stem}.scales"]).double()
            ref, ties = _rtn64(original[f"{stem}.weight"])
            off = ~torch.isclose(deq, ref, rtol=1e-6, atol=0)
            assert not (off & ~ties).any(), f"{stem}: {int(off.sum())} values differ from RTN"
            linears += 1
        elif not key.endswith((".qzeros", ".scales")):  # RTN scales nothing: norms untouched
            assert torch.equal(t, original[key]), key
    assert linears == 4 * 7


def test_awq_not_worse_than_rtn_on_the_other_half(checkpoints, halves):
    model, rtn, awq = checkpoints
    windows = heldout_windows([halves[2]], hf_model.load_tokenizer(model), 256, max_windows=4)
    assert windows.shape == (4, 256)
    layers = [f"awq_layers/layer_{i:05d}.safetensors" for i in range(4)]
    q_rtn = heldout_perplexity(model, [rtn / f for f in layers], windows, torch.device("cpu"))
    q_awq = heldout_perplexity(model, [awq / f for f in layers], windows, torch.device("cpu"))
    assert q_rtn.fp == q_awq.fp < q_rtn.quantized
    assert q_awq.quantized <= q_rtn.quantized, (q_awq, q_rtn)


def test_split_heldout_keeps_a_tenth():
    texts = [f"doc {i}" for i in range(25)]
    calib, held = split_heldout(texts)
    assert calib == texts[:23] and held == texts[23:]
    assert split_heldout(["one"]) == (["one"], [])


def test_cli_rtn_prints_heldout_ppl_and_rejects_clip(halves, capsys, tmp_path):
    _, calib, _ = halves
    flags = ["lite", "auto_awq", "--w_bits", "4", "--w_group_size", str(GROUP), "--calib_dataset",
             calib, "--calib_seqlen", "128", "--device", "cpu", "--w-method", "rtn"]
    assert main(flags + ["--work_dir", str(tmp_path / "a"), "--clip", "True"]) == 2
    assert "needs --w-method awq" in capsys.readouterr().err
    assert main(flags + ["--work_dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    m = re.search(r"perplexity on (\d+) held-out windows of 128 tokens: fp ([\d.]+) -> w4 ([\d.]+)", out)
    assert m and int(m.group(1)) == 16 and float(m.group(2)) < float(m.group(3)), out
    assert "round-to-nearest 4-bit checkpoint written" in out
