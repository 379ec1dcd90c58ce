"""Shared fixtures: tiny checkpoints of every supported family, converted
once per test session."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TPSERVE_CACHE", str(Path(__file__).parent / ".cache"))

from tiny_models import FAMILY_BUILDERS  # noqa: E402

ENGINE_OPTIONS = dict(cache_max_entry_count=128, cache_block_seq_len=16, session_len=512,
                      device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """family -> (HF folder, reference transformers model), built on first use."""
    built: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"hf-{family}")
            built[family] = (folder, FAMILY_BUILDERS[family](folder))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_workspace(tiny_hf, tmp_path_factory):
    """(family, tp) -> converted workspace folder."""
    from tpserve.engine.convert import convert

    built: dict[tuple[str, int], Path] = {}

    def get(family: str, tp: int = 1, model_name: str = "auto"):
        key = (family, tp)
        if key not in built:
            folder, _ = tiny_hf(family)
            dst = tmp_path_factory.mktemp(f"ws-{family}-tp{tp}") / "workspace"
            built[key] = convert(model_name, folder, dst, tp=tp, progress=False)
        return built[key]

    return get


@contextlib.contextmanager
def local_ray(num_cpus: int):
    """A local Ray with at least `num_cpus` logical CPUs for one test module; a Ray started
    here (or restarted for being too small) is shut down at the end."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < num_cpus:
        ray.shutdown()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
