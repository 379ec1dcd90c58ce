"""Per-layer results of a long quantization job, kept so a killed job resumes where it stopped.

``work_dir/awq_layers/`` holds ``job.json`` (the settings the results belong
to) and ``layer_{i:05d}.safetensors`` for every finished layer, each written
to a temporary file and renamed, so a file that exists is complete.
"""

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from tpserve.engine.errors import ConfigError

JOB_FILE = "job.json"


class LayerStore:
    def __init__(self, work_dir: str, job: dict, subdir: str = "awq_layers"):
        self.root = Path(work_dir) / subdir
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_job(job)

    def _check_job(self, job: dict) -> None:
        path = self.root / JOB_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != job:
                changed = sorted(k for k in set(saved) | set(job) if saved.get(k) != job.get(k))
                raise ConfigError(
                    f"{self.root} holds results of a different job ({', '.join(changed)} differ); "
                    f"use another --work-dir or delete {self.root} to start over"
                )
            return
        tmp = path.with_name(f".{JOB_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(job, indent=2, sort_keys=True))
        os.replace(tmp, path)

    def path(self, layer: int) -> Path:
        return self.root / f"layer_{layer:05d}.safetensors"

    def done(self, layer: int) -> bool:
        return self.path(layer).is_file()

    def save(self, layer: int, tensors: dict[str, Tensor]) -> None:
        path = self.path(layer)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
