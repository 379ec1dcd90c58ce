"""Mistakes a user can make with `tpserve convert`: a one-line message, exit 2,
no traceback, and nothing half-written left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def _convert(*args: str):
    cmd = [sys.executable, "-m", "tpserve.cluster.cli", "convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _assert_clean_failure(result, dst, words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tpserve: error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    assert not dst.exists()
    if dst.parent.is_dir():
        assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture()
def hf_copy(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_config(hf_copy, tmp_path):
    (hf_copy / "config.json").unlink()
    dst = tmp_path / "out" / "ws"
    _assert_clean_failure(_convert("llama2", str(hf_copy), "--dst-path", str(dst)), dst,
                          ["config.json"])


def test_unsupported_architecture(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out" / "ws"
    _assert_clean_failure(_convert("llama2", str(hf_copy), "--dst_path", str(dst)), dst,
                          ["GPT2LMHeadModel", "LlamaForCausalLM", "QWenLMHeadModel"])


def test_truncated_safetensors(hf_copy, tmp_path):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out" / "ws"
    _assert_clean_failure(_convert("llama2", str(hf_copy), "--dst-path", str(dst)), dst,
                          ["truncated"])


def test_tp_not_dividing_heads(hf_copy, tmp_path):
    dst = tmp_path / "out" / "ws"
    _assert_clean_failure(_convert("llama2", str(hf_copy), "--dst-path", str(dst), "--tp", "3"),
                          dst, ["tp=3", "attention heads"])


def test_unknown_model_name(hf_copy, tmp_path):
    dst = tmp_path / "out" / "ws"
    _assert_clean_failure(_convert("gpt-9", str(hf_copy), "--dst-path", str(dst)), dst,
                          ["gpt-9", "llama3"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_destination(hf_copy, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    dst = locked / "ws"
    try:
        _assert_clean_failure(_convert("llama2", str(hf_copy), "--dst-path", str(dst)), dst,
                              ["cannot write"])
    finally:
        locked.chmod(0o700)


def test_destination_under_a_file(hf_copy, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    dst = blocker / "ws"
    result = _convert("llama2", str(hf_copy), "--dst-path", str(dst))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr
    assert blocker.read_text() == "not a folder"


def test_existing_workspace_replaced_only_when_done(hf_copy, tmp_path):
    dst = tmp_path / "ws"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    (hf_copy / "config.json").unlink()
    assert _convert("llama2", str(hf_copy), "--dst-path", str(dst)).returncode == 2
    assert (dst / "keep.txt").read_text() == "old"
