"""The bundled demo model through tpserve: the default model everywhere, with
logits equal to transformers', and present in a normal (non-editable) install."""
from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tpserve.engine.demo_model import demo_model_path
from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.llm import LLM

REPO = Path(__file__).resolve().parents[2]


def test_default_model_logits_equal_transformers():
    llm = LLM(None, device="cpu", cache_max_entry_count=64, cache_block_seq_len=16,
              session_len=512)
    assert llm.chat_template.name == "tokenizer"  # the model's own ChatML template
    ids = llm.encode("In the beginning God created the heaven and the earth.")
    batch = ForwardBatch.build([ids], [0], [[0, 1, 2, 3]], llm.executor.block_size)
    batch.logits_indices = torch.arange(len(ids))
    got = llm.executor.execute(batch)
    ref = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_non_editable_install_ships_the_model_and_chats(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps",
                    str(REPO)], check=True, timeout=600)
    env = dict(os.environ, TPSERVE_CACHE=str(tmp_path / "cache"), PYTHONPATH="")
    where = subprocess.run([py, "-c", "import tpserve.engine.demo_model as d; "
                            "print(d.demo_model_path())"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, check=True).stdout.strip()
    assert str(env_dir) in where and str(REPO) not in where
    chat = subprocess.run([env_dir / "bin" / "tpserve", "chat", "--temperature", "0",
                           "--max-new-tokens", "24", "--device", "cpu"],
                          input='What does "hacker" mean?\nexit\n', capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert chat.returncode == 0, chat.stderr
    reply = chat.stdout.split(">>>")[1]
    assert len(reply.split()) >= 3  # it answered in words
