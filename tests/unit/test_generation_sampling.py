"""Pure sampling maths against plain float64 loop references."""
import math

import pytest
import torch

from aligner.generation.params import SamplingParams
from aligner.generation.sampling import (filter_logits, sample_from_probs, sample_next, suppress_eos,
                                         token_logprobs)


def reference_kept(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Indices a top-k-then-nucleus filter keeps, by sorting and walking one row in float64."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept = list(order)
    if 0 < top_k < len(row):
        threshold = row[order[top_k - 1]]
        kept = [i for i in order if row[i] >= threshold]
    if top_p < 1.0:
        peak = max(row[i] for i in kept)
        weights = {i: math.exp(row[i] - peak) for i in kept}
        total = sum(weights.values())
        nucleus, mass = [], 0.0
        for i in kept:  # kept is in descending order
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += weights[i] / total
        kept = nucleus
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (3, 0.01),
                                         (40, 1.0), (0, 0.999)])
def test_filter_logits_matches_sorting_reference(top_k, top_p):
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(top_k * 100 + int(top_p * 1000))) * 3
    out = filter_logits(logits, top_k, top_p)
    for b in range(logits.shape[0]):
        expected = reference_kept(logits[b].double().tolist(), top_k, top_p)
        kept = set(torch.isfinite(out[b]).nonzero().flatten().tolist())
        assert kept == expected, (b, sorted(kept), sorted(expected))
        # kept logits are unchanged (filtering only removes)
        assert torch.equal(out[b][sorted(kept)], logits[b][sorted(kept)])


def test_filter_logits_keeps_the_top_token_even_for_tiny_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [2.0, 2.0 - 1e-3, -1.0, 0.0]])
    out = filter_logits(logits, top_k=0, top_p=1e-9)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]
    assert torch.isfinite(out).float().argmax(-1).tolist() == [1, 0]


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [[False, True, True, False, True]]


def test_filter_logits_does_not_modify_its_input():
    logits = torch.randn(2, 10)
    before = logits.clone()
    filter_logits(logits, 3, 0.5)
    assert torch.equal(logits, before)


def test_suppress_eos_scalar_and_per_row_steps():
    logits = torch.zeros(3, 6)
    assert torch.isinf(suppress_eos(logits, 4, step=1, min_length=2)[:, 4]).all()
    assert torch.equal(suppress_eos(logits, 4, step=2, min_length=2), logits)
    per_row = suppress_eos(logits, 4, step=torch.tensor([0, 3, 1]), min_length=2)
    assert torch.isinf(per_row[:, 4]).tolist() == [True, False, True]
    others = [c for c in range(6) if c != 4]
    assert torch.equal(per_row[:, others], logits[:, others])
    assert torch.equal(suppress_eos(logits, 4, step=0, min_length=0), logits)
    assert torch.equal(logits, torch.zeros(3, 6))  # input untouched


def test_sample_from_probs_matches_inverse_cdf_loop():
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(50, 12, generator=gen)
    probs[probs < 0.3] = 0.0  # zero-probability tokens must never be drawn
    probs[:, 5] += 0.01  # no all-zero rows
    uniform = torch.rand(50, generator=gen)
    uniform[0], uniform[1] = 0.0, 1.0 - 2 ** -24  # both ends of the range
    got = sample_from_probs(probs, uniform)
    for b in range(50):
        row = probs[b].double().tolist()
        target, cumulative, expected = uniform[b].item() * sum(row), 0.0, None
        for i, p in enumerate(row):
            cumulative += p
            if cumulative > target:
                expected = i
                break
        assert got[b].item() == expected, b
        assert probs[b, got[b]] > 0


def test_sample_next_greedy_is_argmax_and_consumes_one_draw_per_row():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    got = sample_next(logits, SamplingParams(greedy=True), gen_a)
    assert got.tolist() == logits.argmax(-1).tolist()
    torch.rand(5, generator=gen_b)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_sample_next_top_k_one_is_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    got = sample_next(logits, SamplingParams(temperature=2.0, top_k=1), torch.Generator().manual_seed(0))
    assert got.tolist() == logits.argmax(-1).tolist()


def test_sample_next_frequencies_follow_the_tempered_filtered_distribution():
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    n = 40000
    draws = sample_next(base.expand(n, -1), params, torch.Generator().manual_seed(4))
    # reference distribution, float64 by hand
    scaled = [x / 0.7 for x in base.double().tolist()]
    kept = reference_kept(scaled, 6, 0.9)
    weights = [math.exp(scaled[i]) if i in kept else 0.0 for i in range(8)]
    expected = [w / sum(weights) for w in weights]
    counts = torch.bincount(draws, minlength=8).double() / n
    for i in range(8):
        if expected[i] == 0.0:
            assert counts[i] == 0.0, i
        else:
            sigma = math.sqrt(expected[i] * (1 - expected[i]) / n)
            assert abs(counts[i] - expected[i]) < 5 * sigma, (i, counts[i].item(), expected[i])


def test_token_logprobs_match_float64_log_softmax():
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(5)) * 4
    tokens = torch.tensor([0, 3, 19, 7, 7, 11])
    got = token_logprobs(logits, tokens)
    for b in range(6):
        row = logits[b].double().tolist()
        lse = math.log(sum(math.exp(x) for x in row))
        assert abs(got[b].item() - (row[tokens[b]] - lse)) < 1e-5
    assert got.dtype == torch.float32
