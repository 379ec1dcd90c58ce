import pytest
import torch

from tpserve.quant.calibrate import calibrate
from tpserve.quant.datasets import calib_windows, load_calib_texts
from test_quant_models import make_tiny, write_calib_text

N_SAMPLES, SEQLEN = 6, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    make_tiny(root / "model", num_key_value_heads=2)
    return root, str(root / "model"), write_calib_text(root / "calib.txt")


@pytest.fixture(scope="module")
def one_worker(setup):
    root, model, data = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as a one-CPU Ray task
    try:
        calibrate(model, data, N_SAMPLES, SEQLEN, str(root / "w1"), num_workers=1, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return {k: torch.load(root / "w1" / f"{k}_stats.pth") for k in ("inputs", "outputs", "key", "value")}


def _reference_layer0(model_path, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64).eval()
    ids = calib_windows(load_calib_texts(data), AutoTokenizer.from_pretrained(model_path), N_SAMPLES, SEQLEN)
    layer = model.model.layers[0]
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        x = layer.input_layernorm(h)
        k = layer.self_attn.k_proj(x).view(N_SAMPLES, SEQLEN, 2, 16).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(N_SAMPLES, SEQLEN, 2, 16)
        pos = torch.arange(SEQLEN)[None]
        cos, sin = model.model.rotary_emb(h, pos)
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    k_rot = k_rot.transpose(1, 2).reshape(-1, 2, 16)
    return x.reshape(-1, 64), k_rot, v.reshape(-1, 2, 16)


def test_stats_match_reference(setup, one_worker):
    _, model, data = setup
    x, k, v = _reference_layer0(model, data)
    inputs = one_worker["inputs"]
    assert set(inputs) == {"max", "min", "absmax", "mean", "absmean"}
    name = "model.layers.0.self_attn.q_proj"
    assert len(inputs["max"]) == 2 * 7
    assert torch.allclose(inputs["absmax"][name].double(), x.abs().amax(0), atol=1e-5)
    assert torch.allclose(inputs["mean"][name].double(), x.mean(0), atol=1e-5)
    assert one_worker["outputs"]["max"]["model.layers.1.mlp.down_proj"].shape == (64,)
    keys, values = one_worker["key"], one_worker["value"]
    assert sorted(keys["max"]) == [0, 1] and keys["max"][0].shape == (2, 16)
    assert torch.allclose(keys["max"][0].double(), k.amax(0), atol=1e-5)  # keys after rotary
    assert torch.allclose(values["min"][0].double(), v.amin(0), atol=1e-5)
