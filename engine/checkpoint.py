"""Reading Hugging Face checkpoints: a local folder or a hub id, safetensors
(single or sharded with an index) or PyTorch .bin files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelFormatError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.model", "*.tiktoken", "*.txt",
                   "*.jinja", "*.py")


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or taken from the
    local hub cache) with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFormatError(f"{path} is a file; pass the model's folder")
        return path
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelFormatError(f"model folder {text} does not exist (and it is not a Hugging Face "
                               f"hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=list(WEIGHT_PATTERNS)))
    except Exception as exc:  # offline, unknown repo, gated model ...
        raise ModelFormatError(
            f"could not fetch {text} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); download it where you have "
            f"network (huggingface-cli download {text} --local-dir DIR) and pass DIR") from None


def read_hf_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ModelFormatError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{file} is not valid JSON ({exc}); re-download the model") from None


class CheckpointReader:
    """Name -> tensor access over every weight file of a checkpoint, loading
    tensors one at a time (safetensors) or file by file (.bin)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._where: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        files = [f for f in files if f.name != "training_args.bin"]
        if not files:
            raise ModelFormatError(f"{path} has no weights (*.safetensors or *.bin)")
        for f in files:
            for name in self._names_in(f):
                self._where[name] = f

    def _names_in(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    return list(f.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelFormatError(f"{file} is not a readable safetensors file ({exc}); "
                                       f"it may be truncated: re-download it") from None
        return list(self._load_bin(file))

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache and self._bin_cache[0] == file:
            return self._bin_cache[1]
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ModelFormatError(f"{file} is not a readable PyTorch checkpoint ({exc}); "
                                   f"it may be truncated: re-download it") from None
        self._bin_cache = (file, state)
        return state

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if file.suffix != ".safetensors":
            return self._load_bin(file)[name]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"cannot read {name} from {file} ({exc}); the file may be "
                                   f"truncated: re-download it") from None
