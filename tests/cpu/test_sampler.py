import torch

from tpserve.engine.request import Request
from tpserve.engine.sampler import SamplingBatch, apply_penalties, sample
from tpserve.engine.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=torch.float64)
V = LOGITS.numel()


def req(params, prompt=(1, 2), output=()):
    r = Request.new("r", list(prompt), params)
    r.token_ids.extend(output)
    return r


def frequencies(params, rows=40_000):
    requests = [req(params)] * rows
    batch = SamplingBatch.build(requests, V)
    tokens = sample(LOGITS.float().expand(rows, V).clone(), batch).token_ids
    return torch.bincount(tokens, minlength=V).double() / rows


def expected(keep, temperature=1.0):
    probs = torch.zeros(V, dtype=torch.float64)
    probs[keep] = torch.softmax(LOGITS[keep] / temperature, dim=0)
    return probs


def assert_close_freqs(freq, probs, tol=0.012):
    assert (freq - probs).abs().max() < tol, (freq, probs)
    assert (freq[probs == 0] == 0).all()


def test_greedy_is_argmax_and_temperature_sampling_matches_softmax():
    logits = torch.randn(5, 11)
    batch = SamplingBatch.build([req(SamplingParams(temperature=0))] * 5, 11)
    assert torch.equal(sample(logits, batch).token_ids, logits.argmax(-1))
    assert_close_freqs(frequencies(SamplingParams(temperature=0.7)), expected(list(range(V)), 0.7))


def test_top_k_mass():
    assert_close_freqs(frequencies(SamplingParams(top_k=3)), expected([0, 1, 2]))


def test_top_p_mass():
    probs = torch.softmax(LOGITS, 0)  # cumulative: .41 .66 .81 .90 ...
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    assert_close_freqs(frequencies(SamplingParams(top_p=0.7)), expected([0, 1, 2]))


def test_top_k_then_top_p_and_min_p():
    # top-k 4 renormalizes to .45 .27 .17 .10; top-p .6 then keeps two
    assert_close_freqs(frequencies(SamplingParams(top_k=4, top_p=0.6)), expected([0, 1]))
    # min_p .3 keeps tokens with p >= .3 * p_max: exp(-1) > .3 > exp(-1.5)
    assert_close_freqs(frequencies(SamplingParams(min_p=0.3)), expected([0, 1, 2]))


def test_mixed_batch_rows_keep_their_own_options():
    rows = 30_000
    params = [SamplingParams(temperature=0), SamplingParams(top_k=2), SamplingParams()]
    requests = [req(params[i % 3]) for i in range(rows)]
    tokens = sample(LOGITS.float().expand(rows, V).clone(), SamplingBatch.build(requests, V)).token_ids
    assert (tokens[0::3] == 0).all()
    assert_close_freqs(torch.bincount(tokens[1::3], minlength=V).double() / (rows / 3), expected([0, 1]), 0.02)
    assert_close_freqs(torch.bincount(tokens[2::3], minlength=V).double() / (rows / 3),
                       expected(list(range(V))), 0.02)


def test_penalties_match_hand_computed_logits():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, -1.0, 2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    r = req(params, prompt=[0, 1], output=[2, 2, 3])
    got = apply_penalties(logits, SamplingBatch.build([r], 6))
    want = torch.tensor([[
        1.0 / 2,  # seen in the prompt, positive: divided
        -2.0 * 2,  # seen in the prompt, negative: multiplied
        3.0 / 2 - 0.25 * 2 - 0.5,  # generated twice
        0.5 / 2 - 0.25 * 1 - 0.5,  # generated once
        -1.0,
        2.0,
    ]])
    assert torch.allclose(got, want)


def test_pending_tokens_count_once_filled_in():
    """Async scheduling: a row's last output token is still being sampled when the batch
    is built; fill_pending puts it (from the previous step's samples) where the penalties
    count it, and the result equals a batch built with the token known."""
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, -1.0, 2.0]] * 3)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    known = [req(params, prompt=[0, 1], output=[2, 2, 3]), req(params, output=[5]),
             req(SamplingParams(), output=[4])]
    waiting = [req(params, prompt=[0, 1], output=[2, 2]), req(params, output=[5]),
               req(SamplingParams(), output=[4])]
    previous_samples = torch.tensor([4, 3, 1])  # row 1 of the last step was request 0's
    batch = SamplingBatch.build(waiting, 6, pending_rows=[1, -1, -1])
    assert not torch.equal(apply_penalties(logits, batch), apply_penalties(
        logits, SamplingBatch.build(known, 6)))
    filled = batch.fill_pending(previous_samples)
    assert filled.pending_rows is None
    assert torch.equal(apply_penalties(logits, filled),
                       apply_penalties(logits, SamplingBatch.build(known, 6)))
    plain = SamplingBatch.build([req(SamplingParams())], 6, pending_rows=[0])
    assert plain.pending_rows is None and plain.fill_pending(None) is plain  # nothing to count


def test_penalties_leave_other_rows_alone():
    logits = torch.randn(2, 6)
    rows = [req(SamplingParams(repetition_penalty=1.5), output=[3]), req(SamplingParams(), output=[3])]
    got = apply_penalties(logits, SamplingBatch.build(rows, 6))
    assert torch.equal(got[1], logits[1]) and not torch.equal(got[0], logits[0])


def _seeded_run(seed, others, steps=6, vocab=50):
    logits_rng = torch.Generator().manual_seed(99)
    table = torch.randn(steps, vocab, generator=logits_rng)
    target = req(SamplingParams(seed=seed, top_p=0.9, temperature=1.3))
    background = [req(SamplingParams(temperature=1.0)) for _ in range(others)]
    tokens = []
    for s in range(steps):
        batch_requests = background[: others // 2] + [target] + background[others // 2:]
        logits = torch.randn(len(batch_requests), vocab)
        logits[others // 2] = table[s]
        out = sample(logits, SamplingBatch.build(batch_requests, vocab)).token_ids
        tokens.append(int(out[others // 2]))
        target.append_token(tokens[-1])
    return tokens


def test_seed_reproduces_whatever_the_batch():
    alone = _seeded_run(7, others=0)
    assert _seeded_run(7, others=3) == alone
    assert _seeded_run(7, others=10) == alone
    assert any(_seeded_run(s, others=0) != alone for s in (8, 9, 10))


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(3, 10)
    params = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.7),
              SamplingParams(temperature=0.5, logprobs=0), SamplingParams()]
    rows = [req(p, prompt=[1, 4]) for p in params]
    out = sample(logits, SamplingBatch.build(rows, 10))
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(out.logprobs.double(), ref.gather(1, out.token_ids[:, None])[:, 0], atol=1e-6)
    top = ref.topk(3, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    assert torch.allclose(out.top_logprobs.double(), top.values, atol=1e-6)


def test_no_logprobs_requested():
    out = sample(torch.randn(2, 5), SamplingBatch.build([req(SamplingParams())] * 2, 5))
    assert out.logprobs is None and out.top_token_ids is None


def test_seeded_draws_follow_the_distribution_step_after_step():
    """One seeded request sampled over many steps: fresh noise each step, right frequencies."""
    target = req(SamplingParams(seed=3, temperature=1.0))
    counts = torch.zeros(V, dtype=torch.float64)
    steps = 4000
    for _ in range(steps):
        token = int(sample(LOGITS.float()[None].clone(), SamplingBatch.build([target], V)).token_ids)
        counts[token] += 1
        target.append_token(token)
    assert torch.allclose(counts / steps, expected(list(range(V))), atol=0.03)


def test_sampling_batch_pickles_and_moves():
    import pickle
    rows = [req(SamplingParams(seed=5, top_k=3, repetition_penalty=1.2, logprobs=2)),
            req(SamplingParams())]
    batch = SamplingBatch.build(rows, V)
    copy = pickle.loads(pickle.dumps(batch)).to("cpu")
    logits = torch.randn(2, V)
    a, b = sample(logits.clone(), batch), sample(logits.clone(), copy)
    assert int(a.token_ids[0]) == int(b.token_ids[0])
    assert torch.equal(a.top_token_ids, b.top_token_ids)
