"""The converted-model folder ("workspace") and its on-disk format.

    workspace/
      tpserve_config.json      format_version, model shape, tp, weight type, chat template name
      tokenizer/               the source model's tokenizer files (and its config.json)
      weights/rank{R}/         this rank's tensors, one safetensors file per layer
          embed_head.safetensors    embedding / LM head slices and the final norm
          layer_0000.safetensors    fused qkv_proj, o_proj, gate_up_proj, down_proj, norms
          kv_qparams.safetensors    optional: layers.{L}.past_kv_scale (k_scale, k_zp, v_scale, v_zp)
      triton_models/weights -> ../weights   (LMDeploy's path, resolved as an alias)

Format version 1. Tensor names are the module names of
`tpserve.engine.models.decoder.DecoderModel` for that rank.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from .config import ModelConfig, QuantConfig, WorkspaceMeta, dump_json
from .errors import ConfigError, ModelFormatError

FORMAT_VERSION = 1
CONFIG_FILE = "tpserve_config.json"


def is_workspace(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def resolve_workspace(path: str | os.PathLike) -> Path:
    """The workspace root from the root itself or any folder inside it
    (`workspace/weights`, LMDeploy's `workspace/triton_models/weights`)."""
    p = Path(path).expanduser().resolve()
    for candidate in (p, *p.parents[:3]):
        if is_workspace(candidate):
            return candidate
    raise ConfigError(f"{path} is not a tpserve workspace (no {CONFIG_FILE} in it or its parents); "
                      f"create one with `tpserve convert MODEL_NAME MODEL_PATH --dst-path {path}`")


def rank_dir(workspace: Path, rank: int) -> Path:
    return workspace / "weights" / f"rank{rank}"


def write_meta(workspace: Path, meta: WorkspaceMeta) -> None:
    d = asdict(meta)
    d["model"] = meta.model.to_dict()
    d["format_version"] = FORMAT_VERSION
    atomic_write_text(workspace / CONFIG_FILE, dump_json(d))


def read_meta(workspace: Path) -> WorkspaceMeta:
    file = workspace / CONFIG_FILE
    try:
        d = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read {file} ({exc}); convert the model again") from None
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{file} has format version {version}; this tpserve reads version "
                               f"{FORMAT_VERSION}: convert the model again")
    d["model"] = ModelConfig.from_dict(d["model"])
    d["quant"] = QuantConfig(**d.get("quant", {}))
    return WorkspaceMeta(**d)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """Yields a temporary folder beside dst; on success it replaces dst whole,
    on failure it is removed and dst is left as it was."""
    dst = dst.expanduser().resolve()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot write to {dst.parent} ({exc.strerror}); choose another "
                          f"destination") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_lmdeploy_alias(workspace: Path) -> None:
    """`triton_models/weights` points at `weights`, so LMDeploy-style paths work."""
    alias = workspace / "triton_models"
    alias.mkdir(exist_ok=True)
    try:
        (alias / "weights").symlink_to(Path("..") / "weights", target_is_directory=True)
    except OSError:  # no symlinks on this filesystem: resolve_workspace still maps the path
        (alias / "weights").mkdir(exist_ok=True)
