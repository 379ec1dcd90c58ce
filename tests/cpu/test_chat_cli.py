"""`tpserve chat`: the session's KV is reused across turns; end and exit work."""
from __future__ import annotations

import io
import subprocess
import sys

import torch

from conftest import ENGINE_OPTIONS
from tpserve.cluster.chat_cli import ChatSession
from tpserve.engine.llm import LLM
from tpserve.engine.sampling_params import SamplingParams


def test_second_turn_continues_the_cached_session(tiny_hf, tiny_workspace):
    _, ref = tiny_hf("llama")
    llm = LLM(tiny_workspace("llama"), model_name="qwen-7b", **ENGINE_OPTIONS)
    chat = ChatSession(llm, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                       out=io.StringIO())
    chat.reply("hello there")
    context = llm.engine.scheduler.session_context(chat.session_id)
    turn2 = chat.prompt_ids("and again")
    # only the new turn is encoded, far less than the whole conversation
    assert 0 < len(turn2) < len(context)
    chat.reply("and again")
    after = llm.engine.scheduler.session_context(chat.session_id)
    assert after[:len(context)] == context
    assert after[len(context):len(context) + len(turn2)] == turn2
    reply = after[len(context) + len(turn2):]
    # what the cached session produced equals a fresh greedy run over the whole history
    history = torch.tensor([after[:len(context) + len(turn2)]])
    with torch.no_grad():
        want = ref.generate(history, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            pad_token_id=0)[0, history.shape[1]:].tolist()
    assert reply == want
    chat.reset()
    assert llm.engine.scheduler.session_context(chat.session_id - 1) == []


def test_chat_command_end_and_exit(tiny_workspace):
    ws = tiny_workspace("llama")
    cmd = [sys.executable, "-m", "tpserve.cluster.cli", "chat", "turbomind", str(ws),
           "--temperature", "0", "--max_new_tokens", "4", "--cache-max-entry-count", "64",
           "--cache_block_seq_len", "16", "--session-len", "256", "--device", "cpu"]
    result = subprocess.run(cmd, input="hello\nend\nhi again\nexit\nnever read\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count(">>>") == 4  # hello, end, hi again, exit
    assert "[new session]" in result.stdout
