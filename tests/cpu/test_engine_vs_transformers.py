"""The serving engine's greedy tokens equal transformers' on a tiny Llama: shared
prefixes, prefix-cache hits, chunked prefill, and preemption (see engine_scenarios)."""
from conftest import ENGINE_OPTIONS
from engine_scenarios import check_scenarios


def test_engine_scenarios_match_transformers(tiny_hf, tiny_workspace):
    _, ref = tiny_hf("llama")
    counters = check_scenarios(tiny_workspace("llama"), ref, ENGINE_OPTIONS, block_size=16)
    assert counters["prefix_hits"] > 0 and counters["preemptions"] > 0
