import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tpserve.engine.errors import ConfigError, ModelFormatError
from tpserve.quant import awq_layer
from tpserve.quant.awq import auto_awq, first_layer_inputs, layer_forward
from tpserve.quant.awq_layer import AwqSettings, FeatureRecorder, layer_tensors, quantize_layer, sample_positions
from tpserve.quant.awq_search import find_scales
from tpserve.quant.datasets import calib_windows, load_calib_texts
from tpserve.quant.quantize import dequantize_awq, fake_quantize
from test_quant_models import make_tiny, write_calib_text

GROUP = 32


def dequantized_state(tensors: dict) -> dict:
    """Checkpoint tensors with every (qweight, qzeros, scales) triple replaced by a float weight."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            stem = key.removesuffix(".qweight")
            out[f"{stem}.weight"] = dequantize_awq(t, tensors[f"{stem}.qzeros"], tensors[f"{stem}.scales"])
        elif not key.endswith((".qzeros", ".scales")):
            out[key] = t.float()
    return out


def test_search_beats_rtn_on_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    x[:, [2, 33, 70, 101]] *= 40.0
    weights = [torch.randn(96, 128, generator=gen) * 0.02, torch.randn(32, 128, generator=gen) * 0.02]
    found = find_scales(x, x.abs().mean(0), weights, bits=4, group_size=GROUP)
    assert found.loss < 0.7 * found.rtn_loss
    assert found.scales.shape == (128,) and found.scales[[2, 33, 70, 101]].min() > found.scales.median()
    fast = find_scales(x, x.abs().amax(0), weights, bits=4, group_size=GROUP, search=False)
    assert fast.ratio == 0.5


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_outliers")
    make_tiny(root / "model", outliers=True)
    return str(root / "model"), write_calib_text(root / "calib.txt")


def test_awq_layer_output_beats_rtn(outlier_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, data = outlier_model
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    windows = calib_windows(load_calib_texts(data), AutoTokenizer.from_pretrained(model_path), 8, 32)
    inps, kwargs = first_layer_inputs(model, windows, torch.device("cpu"))
    layer = model.model.layers[0]
    ref = layer_forward(layer, inps, kwargs)
    settings = AwqSettings(group_size=GROUP)

    def output_error(tensors):
        q_layer = copy.deepcopy(layer)
        q_layer.load_state_dict({k.removeprefix("L."): v for k, v in dequantized_state(tensors).items()})
        return (layer_forward(q_layer, inps, kwargs) - ref).pow(2).mean().item()

    rtn = output_error(layer_tensors(copy.deepcopy(layer), "L", settings, torch.float32))
    awq_layer_copy = copy.deepcopy(layer)
    recorder = FeatureRecorder(awq_layer_copy, sample_positions(32, 8, 4096))
    layer_forward(awq_layer_copy, inps, kwargs)
    awq = output_error(quantize_layer(awq_layer_copy, recorder.finish(), "L", settings, torch.float32))
    assert awq < 0.8 * rtn
    # judged by the attention and MLP outputs (as AutoAWQ), the layer output is as good or better
    block_copy = copy.deepcopy(layer)
    recorder = FeatureRecorder(block_copy, sample_positions(32, 8, 4096))
    layer_forward(block_copy, inps, kwargs)
    block = output_error(quantize_layer(block_copy, recorder.finish(), "L", settings, torch.float32,
                                        attention_inputs=(inps, kwargs)))
    assert block < 0.8 * rtn


def test_block_search_measures_the_block_output(outlier_model):
    """find_scales with a block: the reported losses are the block output's errors, and the
    block can be moved (as Ray tasks receive it) without moving the caller's module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpserve.quant.awq_blocks import ModuleBlock
    from tpserve.quant.ray_tasks import to_device

    model_path, data = outlier_model
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    windows = calib_windows(load_calib_texts(data), AutoTokenizer.from_pretrained(model_path), 4, 32)
    inps, kwargs = first_layer_inputs(model, windows, torch.device("cpu"))
    layer = model.model.layers[0]
    names = ("q_proj", "k_proj", "v_proj")
    hidden = layer.input_layernorm(inps)
    block = ModuleBlock(layer.self_attn, names, (), {**kwargs, "hidden_states": hidden})
    weights = [layer.self_attn.get_submodule(n).weight.detach().clone() for n in names]
    x = hidden.reshape(-1, hidden.shape[-1])
    found = find_scales(x, x.abs().mean(0), weights, bits=4, group_size=GROUP,
                        block=to_device(block, "cpu"))
    with torch.no_grad():
        ref = layer.self_attn(**kwargs, hidden_states=hidden)[0]
        rtn_layer = copy.deepcopy(layer)
        for n in names:
            w = rtn_layer.self_attn.get_submodule(n).weight
            w.copy_(fake_quantize(w, 4, GROUP))
        rtn = (rtn_layer.self_attn(**kwargs, hidden_states=hidden)[0] - ref).pow(2).mean().item()
    assert found.rtn_loss == pytest.approx(rtn, rel=1e-4)
    assert found.loss <= found.rtn_loss
    for n, w in zip(names, weights):  # the caller's module is untouched
        assert torch.equal(layer.self_attn.get_submodule(n).weight, w)


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def _load(model_path, state=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if state is None:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(model_path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def _relative_error(model_path, out_dir=None):
    """Logit error of the AWQ checkpoint (dequantized) or, without one, of round-to-nearest."""
    ref_model = _load(model_path)
    ref = ref_model(IDS).logits
    if out_dir is None:
        for module in ref_model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, 4, GROUP))
        got = ref_model(IDS).logits
    else:
        got = _load(out_dir, dequantized_state(load_file(f"{out_dir}/model.safetensors")))(IDS).logits
    return ((got - ref).norm() / ref.norm()).item()


def test_auto_awq_end_to_end_and_resume(outlier_model, tmp_path, monkeypatch):
    model_path, data = outlier_model
    work = tmp_path / "work"
    kwargs = dict(w_group_size=GROUP, calib_dataset=data, calib_samples=8, calib_seqlen=32, clip=True, device="cpu")
    out = auto_awq(model_path, str(work), **kwargs)
    config = json.loads((work / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True
    }
    assert (work / "tokenizer.json").is_file() and out == str(work)
    first = load_file(work / "model.safetensors")
    assert first["model.layers.1.self_attn.q_proj.qweight"].dtype == torch.int32
    assert first["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16
    awq_error = _relative_error(model_path, str(work))
    assert awq_error < 0.25 and awq_error < 0.75 * _relative_error(model_path)

    calls = []
    real = awq_layer.quantize_layer
    monkeypatch.setattr(awq_layer, "quantize_layer", lambda layer, *a, **k: calls.append(1) or real(layer, *a, **k))
    (work / "model.safetensors").unlink()
    (work / "config.json").unlink()
    auto_awq(model_path, str(work), **kwargs)  # every layer done: nothing recomputed
    assert calls == []
    (work / "awq_layers" / "layer_00001.safetensors").unlink()
    auto_awq(model_path, str(work), **kwargs)  # only the missing layer
    assert calls == [1]
    again = load_file(work / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(ConfigError, match="different job"):
        auto_awq(model_path, str(work), **{**kwargs, "clip": False})
    with pytest.raises(ConfigError, match="already quantized"):
        auto_awq(str(work), str(tmp_path / "again"), **kwargs)


def test_auto_awq_qwen2_gqa_tied_fast(tmp_path):
    model_path = tmp_path / "qwen2"
    make_tiny(model_path, family="qwen2", num_key_value_heads=2, tie_word_embeddings=True)
    data = write_calib_text(tmp_path / "calib.txt")
    work = tmp_path / "work"
    auto_awq(str(model_path), str(work), w_group_size=GROUP, calib_dataset=data, calib_samples=4,
             calib_seqlen=32, search_scale=False, device="cpu")
    tensors = load_file(work / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embeddings
    assert tensors["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert _relative_error(str(model_path), str(work)) < 0.25


def test_bad_settings(outlier_model, tmp_path):
    model_path, data = outlier_model
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    with pytest.raises(ModelFormatError, match="conversion script"):
        auto_awq(str(tmp_path / "remote"), str(tmp_path / "w"), calib_dataset=data)
    with pytest.raises(ConfigError, match="4-bit"):
        auto_awq(model_path, str(tmp_path), w_bits=8, calib_dataset=data)
    with pytest.raises(ConfigError, match="group-size"):
        auto_awq(model_path, str(tmp_path), w_group_size=48, calib_dataset=data, device="cpu")
