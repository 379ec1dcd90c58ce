"""ServeConfig: what one served model needs, parsed once from `build_app` args.

Args come from `serve run tpserve.cluster.app:build_app model=... tp=2` (all
strings), from a YAML `args:` block (typed) or from `tpserve serve api_server`.
Keys that are not ServeConfig fields are engine options (`session_len=4096`,
`cache_max_entry_count=0.8`, ...) and are handed to the engine, which checks them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpserve.engine.errors import ConfigError

from .openai_api import DEFAULT_MAX_BODY_BYTES, APIOptions

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_ENGINE_FACTORY = "tpserve.cluster.deployment:llm_engine_factory"


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # a workspace or Hugging Face model; None = the bundled demo model
    model_name: str | None = None
    tp: int | None = None  # None = the workspace's own
    instance_num: int = 64  # LMDeploy's name: requests batched at once (engine max_batch_size)
    num_replicas: int = 1
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = 256
    placement_strategy: str = "STRICT_PACK"
    device: str = "auto"
    cpus_per_replica: float = 1.0
    api_keys: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    engine_options: dict = field(default_factory=dict)
    engine_factory: str = DEFAULT_ENGINE_FACTORY

    def __post_init__(self) -> None:
        if self.tp is not None and self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")
        for name in ("instance_num", "num_replicas", "max_ongoing_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.placement_strategy not in STRATEGIES:
            raise ConfigError(f"placement_strategy must be one of {', '.join(STRATEGIES)}; "
                              f"got {self.placement_strategy!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")

    def resolved_tp(self) -> int:
        """tp, or the workspace's when unset and the workspace is on this machine (else 1)."""
        if self.tp is not None:
            return self.tp
        from tpserve.engine.workspace import is_workspace, read_meta, resolve_workspace

        if self.model and Path(self.model).is_dir():
            try:
                ws = resolve_workspace(self.model)
            except ConfigError:  # a Hugging Face folder: converted for tp=1 by default
                return 1
            if is_workspace(ws):
                return read_meta(ws).tp
        return 1

    def api_options(self) -> APIOptions:
        return APIOptions(api_keys=self.api_keys, allow_origins=self.allow_origins,
                          max_body_bytes=self.max_body_bytes)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {}
        engine_options = {k: _guess(v) for k, v in (args.get("engine_options") or {}).items()}
        for key, value in args.items():
            key = key.replace("-", "_")
            if key == "engine_options":
                continue
            if key in fields:
                known[key] = _coerce(key, value, fields[key].type)
            else:
                engine_options[key] = _guess(value)
        return cls(**known, engine_options=engine_options)


def _guess(value: Any) -> Any:
    """A string from the command line as the bool/int/float it spells, else unchanged."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _coerce(key: str, value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if "tuple" in type_name:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    if type_name.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    try:
        if type_name.startswith("int"):
            return int(value)
        if type_name.startswith("float"):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    return str(value)
