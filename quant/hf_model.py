"""Loading a Hugging Face causal LM for the offline quantization jobs.

Only families built into transformers with the Llama decoder layout are
accepted (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``.mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``),
loaded without ``trust_remote_code``.
"""

import json
from pathlib import Path

import torch
from torch import nn

from tpserve.engine.errors import ConfigError, ModelFormatError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no GPU is visible; use --device cpu")
    return dev


def read_hf_config(model_path: str) -> dict:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ModelFormatError(
            f"{model_path} has no config.json; pass a local Hugging Face model folder"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_family(config: dict, model_path: str) -> None:
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ModelFormatError(
            f"{model_path} is a {family!r} model; the quantization jobs support "
            f"{', '.join(SUPPORTED_FAMILIES)} (families built into transformers). Models that need "
            "trust_remote_code (InternLM, Qwen v1) must first be converted to the Llama layout "
            "with their authors' conversion script."
        )


def check_float_checkpoint(config: dict, model_path: str) -> None:
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"{model_path} is already quantized ({method}); start from the float checkpoint")


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint was saved in (``dtype`` / ``torch_dtype``), float16 when unsaid."""
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float16


def compute_dtype(config: dict, device: torch.device) -> torch.dtype:
    """float32 on the CPU; the checkpoint's half type on a GPU."""
    if device.type == "cpu":
        return torch.float32
    dtype = checkpoint_dtype(config)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def load_causal_lm(model_path: str, dtype: torch.dtype) -> nn.Module:
    """The model in eval mode on the CPU (callers move what they need to the device)."""
    from transformers import AutoModelForCausalLM

    config = read_hf_config(model_path)
    check_family(config, model_path)
    check_float_checkpoint(config, model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa"
    )
    return model.eval()


def load_tokenizer(model_path: str):
    """The model's tokenizer, for whole texts that the caller cuts into windows: so
    no limit on length (transformers would warn past the model's maximum)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    tokenizer.model_max_length = int(1e30)  # transformers' own "no limit"
    return tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """``{relative name: nn.Linear}`` of one decoder layer, e.g. ``self_attn.q_proj``."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
