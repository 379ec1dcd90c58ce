"""Every supported family: tpserve's logits and greedy tokens equal transformers'."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENGINE_OPTIONS
from tiny_models import FAMILY_BUILDERS
from tpserve.engine.config import EngineConfig
from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.llm import LLM
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.workspace import rank_dir, read_meta

FAMILIES = list(FAMILY_BUILDERS)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 256, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_chunked_prefill(family, tiny_hf, tiny_workspace):
    _, ref = tiny_hf(family)
    ws = tiny_workspace(family)
    runner = ModelRunner(ws, read_meta(ws), EngineConfig(**ENGINE_OPTIONS))
    ids = _prompt(41, seed=1)
    blocks = [[5, 2, 7]]  # out-of-order blocks: the block table must be honoured
    first = ForwardBatch.build([ids[:23]], [0], blocks, runner.block_size)
    first.logits_indices = torch.arange(23)
    second = ForwardBatch.build([ids[23:]], [23], blocks, runner.block_size)
    second.logits_indices = torch.arange(18)
    got = torch.cat([runner.execute(first), runner.execute(second)])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers(family, tiny_hf, tiny_workspace):
    _, ref = tiny_hf(family)
    llm = LLM(tiny_workspace(family), **ENGINE_OPTIONS)
    prompts = [_prompt(n, seed=n) for n in (3, 19, 37)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == want


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_shards_reassemble(family, tiny_workspace):
    whole = _load(tiny_workspace(family, 1), 0)
    parts = [_load(tiny_workspace(family, 2), r) for r in (0, 1)]
    meta = read_meta(tiny_workspace(family, 1))
    cfg = meta.model
    vocab = cfg.vocab_size
    embed = torch.cat([p["embed_tokens.weight"] for p in parts])
    torch.testing.assert_close(embed[:vocab], whole["embed_tokens.weight"][:vocab], rtol=0, atol=0)
    assert embed[vocab:].abs().sum() == 0  # padding rows
    hd, q = cfg.head_dim, cfg.q_size // 2
    kv = cfg.kv_size // 2 if cfg.num_kv_heads >= 2 else cfg.kv_size
    for layer in range(cfg.num_layers):
        pre = f"layers.{layer}."
        qkv = [p[pre + "self_attn.qkv_proj.weight"].split([q, kv, kv]) for p in parts]
        fused = torch.cat([torch.cat([s[i] for s in qkv]) for i in range(3)])
        torch.testing.assert_close(fused, whole[pre + "self_attn.qkv_proj.weight"], rtol=0, atol=0)
        o = torch.cat([p[pre + "self_attn.o_proj.weight"] for p in parts], dim=1)
        torch.testing.assert_close(o, whole[pre + "self_attn.o_proj.weight"], rtol=0, atol=0)
        inter = cfg.intermediate_size // 2
        gate = torch.cat([p[pre + "mlp.gate_up_proj.weight"][:inter] for p in parts])
        up = torch.cat([p[pre + "mlp.gate_up_proj.weight"][inter:] for p in parts])
        torch.testing.assert_close(torch.cat([gate, up]), whole[pre + "mlp.gate_up_proj.weight"],
                                   rtol=0, atol=0)
        down = torch.cat([p[pre + "mlp.down_proj.weight"] for p in parts], dim=1)
        torch.testing.assert_close(down, whole[pre + "mlp.down_proj.weight"], rtol=0, atol=0)
    assert hd * cfg.num_heads == cfg.q_size


def _load(ws, rank):
    out = {}
    for f in sorted(rank_dir(ws, rank).glob("*.safetensors")):
        out.update(load_file(f))
    return out
