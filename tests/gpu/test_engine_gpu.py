"""The serving engine on a GPU at real widths (Llama-3-8B's hidden size, heads,
GQA and vocab; two layers): greedy tokens equal transformers' in every engine
scenario, with decode running through CUDA graphs; graphs equal eager; the
prefill kernel's variants are compiled as the engine starts, not while it serves;
and the same model in 4 bits matches transformers on its dequantized weights
through every 4-bit kernel a step can take."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from engine_scenarios import check_scenarios, greedy, shared_prefix_prompts  # noqa: E402
from tpserve.engine.convert import convert  # noqa: E402
from tpserve.engine.demo_model import demo_model_path  # noqa: E402
from tpserve.engine.llm import LLM  # noqa: E402

OPTIONS = dict(dtype="float32", device="cuda", session_len=1024, max_batch_size=16,
               cache_max_entry_count=0.3)


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).float().eval()
    folder = tmp_path_factory.mktemp("llama3-width")
    model.save_pretrained(folder / "hf")
    for f in demo_model_path().glob("*.json"):  # a tokenizer for the engine (ids < 4096)
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, folder / "hf" / f.name)
    ws = convert("llama3", folder / "hf", folder / "ws", tp=1, progress=False)
    return ws, model


def test_engine_scenarios_match_transformers_at_real_width(real_width):
    ws, model = real_width
    torch.backends.cuda.matmul.allow_tf32 = False
    counters = check_scenarios(ws, model, OPTIONS, block_size=64, max_tokens=24)
    print(f"{torch.cuda.get_device_name()}: {counters}")


def test_cuda_graphs_equal_eager(real_width):
    ws, _ = real_width
    prompts = shared_prefix_prompts(128256, seed=1) * 3  # 15 rows: a padded graph size
    options = OPTIONS
    runs = {}
    for eager in (True, False):
        llm = LLM(ws, eager_mode=eager, **options)
        try:
            assert (llm.executor.graphs is None) == eager
            assert (llm.executor.mixed_graphs is None) == eager
            runs[eager] = greedy(llm, prompts, 32)
        finally:
            llm.shutdown()
    same = sum(a == b for a, b in zip(runs[True], runs[False]))
    assert same == len(prompts), f"{len(prompts) - same} of {len(prompts)} rows differ"


def test_mixed_graphs_equal_eager_forward(real_width):
    """A step of decodes beside prompt chunks (36 tokens, padded to a 48-token graph)
    gives the eager forward's logits through the graphs captured in pieces."""
    from tpserve.engine.forward_batch import ForwardBatch

    ws, _ = real_width
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(ws, **OPTIONS)
    try:
        runner = llm.executor
        assert runner.mixed_graphs is not None
        gen = torch.Generator().manual_seed(3)
        lens = [40, 70, 5, 30, 77]  # contexts already cached
        tables = [list(range(4 * b + 1, 4 * b + 5)) for b in range(len(lens))]
        ids = [torch.randint(0, 4000, (n + 20,), generator=gen).tolist() for n in lens]
        first = ForwardBatch.build([x[:n] for x, n in zip(ids, lens)], [0] * len(lens),
                                   tables, 64)
        with torch.inference_mode():
            runner._forward(first.to(runner.device))  # eager: fills the cache
        # three decodes, then two prompt chunks of 20 and 13 tokens
        new = [ids[0][40:41], ids[1][70:71], ids[2][5:6], ids[3][30:50], ids[4][77:90]]
        batch = ForwardBatch.build(new, lens, tables, 64, want_logits=[True] * 4 + [False])
        assert batch.num_decodes == 3 and batch.num_tokens == 36
        with torch.inference_mode():
            graphed = runner.execute(batch).clone()
            eager = runner._forward(batch.to(runner.device))
        assert graphed.shape == eager.shape == (4, 128256)
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    finally:
        llm.shutdown()


def test_async_scheduling_equals_one_step_at_a_time(real_width):
    """Pending tokens fed on the device (CUDA graphs, pinned copies behind an event) give
    the tokens of one step at a time, also where rows end early on a stop token and
    where penalties count the pending token."""
    from tpserve.engine.sampling_params import SamplingParams

    ws, _ = real_width
    prompts = shared_prefix_prompts(128256, seed=2) * 2
    runs = {}
    for mode in (False, True):
        llm = LLM(ws, async_scheduling=mode, **OPTIONS)
        try:
            plain = greedy(llm, prompts, 32)
            stop = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True,
                                  stop_token_ids=[runs[False][0][0][5]] if runs else [plain[0][5]])
            penalized = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True,
                                       repetition_penalty=1.3, frequency_penalty=0.2)
            runs[mode] = (plain, [o.token_ids for o in llm.generate(prompts, stop)],
                          [o.token_ids for o in llm.generate(prompts, penalized)])
        finally:
            llm.shutdown()
    assert runs[True] == runs[False]
    plain, stopped, _ = runs[True]
    assert len(stopped[0]) == plain[0].index(plain[0][5]) + 1 < len(plain[0])  # stopped early



@pytest.mark.parametrize("at_start", [True, False])
def test_prompt_attention_is_compiled_at_start(real_width, monkeypatch, at_start):
    """Prompts that need each query tile height of the prefill kernel, one at a time,
    meet no variant of it left to compile: the runner compiled them as it started.
    Without that (at_start=False) the same prompts compile three while serving."""
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.kernels.attention_prefill import _prefill_kernel
    from tpserve.kernels.testing import TritonVariants

    if not hasattr(_prefill_kernel, "device_caches"):
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    if not at_start:
        monkeypatch.setattr(ModelRunner, "_compile_prompt_attention", lambda self: None)
    ws, _ = real_width
    _prefill_kernel.device_caches.clear()  # as in a fresh process (earlier tests ran it)
    llm = LLM(ws, **OPTIONS)
    try:
        with TritonVariants() as variants:
            for n in (5, 20, 40, 100, 300):  # tiles of 16, 32, 64, 64 and 64 rows
                greedy(llm, [list(range(1, n + 1))], 1)
    finally:
        llm.shutdown()
    if not variants.available:
        pytest.skip("this Triton has no compile hook")
    late = [key for name, key in variants.seen if name == "_prefill_kernel"]
    if at_start:
        assert not late, f"{len(late)} prefill variants compiled while serving: {late}"
    else:
        assert len(late) >= 3, late


@pytest.fixture(scope="module")
def awq_real_width(real_width, tmp_path_factory):
    """The real-width model rounded to 4 bits (groups of 128) by `lite auto_awq`, as a
    workspace, and transformers' model holding the checkpoint's weights dequantized."""
    from safetensors.torch import load_file

    from tpserve.cluster.cli import main
    from tpserve.quant.quantize import dequantize_awq

    ws, model = real_width
    root = tmp_path_factory.mktemp("llama3-width-w4")
    assert main(["lite", "auto_awq", "--model", str(ws.parent / "hf"), "--w-bits", "4",
                 "--w-group-size", "128", "--w-method", "rtn", "--eval-ppl", "False",
                 "--work-dir", str(root / "awq")]) == 0
    assert main(["convert", "llama3", str(root / "awq"), "--model-format", "awq",
                 "--group-size", "128", "--dst-path", str(root / "ws")]) == 0
    tensors = {}
    for f in sorted((root / "awq").glob("*.safetensors")):
        tensors.update(load_file(str(f), device="cuda"))
    state = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            stem = key.removesuffix(".qweight")
            state[f"{stem}.weight"] = dequantize_awq(t, tensors[f"{stem}.qzeros"],
                                                     tensors[f"{stem}.scales"])
        elif not key.endswith((".qzeros", ".scales")):
            state[key] = t.float()
    reference = copy.deepcopy(model)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return root / "ws", reference


def test_w4a16_engine_matches_dequantized_transformers(awq_real_width):
    """The 4-bit engine in bf16 against transformers in float32 on the same (dequantized)
    weights, for every path of `AWQTinyGemmMethod` and `w4a16_gemm`: prompt GEMMs of 300
    rows (dequantized for cuBLAS) and of 100 (the joined tile), decode steps of 1 row
    (PyTorch's int4 matmul), 8 (the codes kernel) and 40 (the joined tile, from CUDA
    graphs). The error bound is bf16's; a wrong nibble, zero or scale is far above it."""
    from tpserve.engine.forward_batch import ForwardBatch

    ws, reference = awq_real_width
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(5)
    llm = LLM(ws, **dict(OPTIONS, dtype="bfloat16", max_batch_size=64))
    errors = {}

    def check(name, got, seqs, rows):
        """got [len(rows), vocab] against transformers' logits at rows[i] of seqs[i]."""
        with torch.no_grad():
            want = torch.cat([reference(torch.tensor([seq], device="cuda")).logits[0, r]
                              .reshape(-1, got.shape[-1]) for seq, r in zip(seqs, rows)])
        errors[name] = float((got.float().cpu() - want.cpu()).norm() / want.norm())
        assert errors[name] < 0.05, errors

    try:
        runner = llm.executor
        with torch.inference_mode():
            for n in (300, 100):  # one prompt, every position's logits
                ids = torch.randint(0, 4000, (n,), generator=gen).tolist()
                batch = ForwardBatch.build([ids], [0], [list(range(8))], 64)
                batch.logits_indices = torch.arange(n)
                check(f"prompt of {n}", runner.execute(batch).clone(), [ids], [slice(None)])
            for b in (1, 8, 40):  # b prompts of 3-9 tokens in one step, then one decode
                seqs = [torch.randint(0, 4000, (int(n) + 1,), generator=gen).tolist()
                        for n in torch.randint(3, 10, (b,), generator=gen)]
                tables = [[i] for i in range(b)]
                runner.execute(ForwardBatch.build([s[:-1] for s in seqs], [0] * b, tables, 64))
                step = ForwardBatch.build([s[-1:] for s in seqs], [len(s) - 1 for s in seqs],
                                          tables, 64)
                check(f"decode of {b}", runner.execute(step).clone(), seqs, [-1] * b)
    finally:
        llm.shutdown()
    print(f"{torch.cuda.get_device_name()}: relative logit errors {errors}")
