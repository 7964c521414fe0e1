"""Critic-free advantage estimators, reward transforms, KL estimators and masks.

Every estimator is compared with a float64 reference written here with plain Python loops over
lists (statistics from ``statistics``), independently of the vectorised implementation, plus
the edge cases: all-equal groups give exactly zero (no NaN), invalid samples are ignored,
rows with an empty mask stay zero, ``num_generations=1`` is refused naming the config key.
"""

import math
import random
import statistics
import threading

import pytest
import torch

from aligner.objectives.advantages import (
    broadcast_to_tokens,
    check_num_generations,
    discounted_returns,
    groups_with_distinct_rewards,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from aligner.objectives.kl import exact_kl, token_kl
from aligner.objectives.masks import length_mask, response_mask
from aligner.objectives.rewards import overlong_reward_penalty, standardize_rewards

# --- references (plain Python, float64) ------------------------------------------------------


def ref_grpo(rewards, n, norm_by_std, valid=None, eps=1e-6):
    valid = valid or [True] * len(rewards)
    out = []
    for g in range(0, len(rewards), n):
        members = [rewards[i] for i in range(g, g + n) if valid[i]]
        for i in range(g, g + n):
            if not valid[i] or len(members) < 2 or len(set(members)) == 1:
                out.append(0.0)
                continue
            mean = statistics.fmean(members)
            adv = rewards[i] - mean
            if norm_by_std:
                adv /= statistics.stdev(members) + eps
            out.append(adv)
    return out


def ref_rloo(rewards, n, valid=None):
    valid = valid or [True] * len(rewards)
    out = []
    for g in range(0, len(rewards), n):
        idx = [i for i in range(g, g + n) if valid[i]]
        for i in range(g, g + n):
            others = [rewards[j] for j in idx if j != i]
            if not valid[i] or not others or len({rewards[j] for j in idx}) == 1:
                out.append(0.0)
            else:
                out.append(rewards[i] - sum(others) / len(others))
    return out


def ref_returns(token_rewards, mask, gamma):
    out = []
    for row_r, row_m in zip(token_rewards, mask):
        row = [0.0] * len(row_r)
        running = 0.0
        for t in reversed(range(len(row_r))):
            running = (row_r[t] + gamma * running) if row_m[t] else 0.0
            row[t] = running
        out.append(row)
    return out


def ref_whiten(values, mask, eps=1e-8):
    selected = [v for row_v, row_m in zip(values, mask) for v, m in zip(row_v, row_m) if m]
    mean = statistics.fmean(selected)
    var = statistics.variance(selected) if len(selected) > 1 else 0.0
    return [[(v - mean) / math.sqrt(var + eps) if m else 0.0 for v, m in zip(row_v, row_m)]
            for row_v, row_m in zip(values, mask)]


def ref_rpp_baseline(rewards, mask, n, valid=None, eps=1e-8):
    valid = valid or [True] * len(rewards)
    centred = []
    for g in range(0, len(rewards), n):
        members = [rewards[i] for i in range(g, g + n) if valid[i]]
        for i in range(g, g + n):
            ok = valid[i] and len(members) >= 2 and len(set(members)) > 1
            centred.append(rewards[i] - statistics.fmean(members) if ok else 0.0)
    token_mask = [[m and valid[i] for m in row] for i, row in enumerate(mask)]
    values = [[c] * len(row) for c, row in zip(centred, mask)]
    return ref_whiten(values, token_mask, eps)


def _random_rewards(rng, groups, n, levels=None):
    if levels is None:
        return [rng.gauss(0, 1) for _ in range(groups * n)]
    return [float(rng.choice(levels)) for _ in range(groups * n)]


def _random_mask(rng, batch, width, empty_rows=()):
    """Rows 0..0 1..1 0..0 (prompt, response, padding); the rows in ``empty_rows`` all 0."""
    mask = []
    for b in range(batch):
        start = rng.randrange(0, width)
        stop = rng.randrange(start + 1, width + 1)
        mask.append([int(start <= t < stop and b not in empty_rows) for t in range(width)])
    return mask


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# --- check_num_generations -------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_one_generation_refused_for_group_estimators_naming_the_key(estimator):
    with pytest.raises(ValueError, match=r"model\.grpo\.num_generations=1") as e:
        check_num_generations(estimator, 1)
    assert estimator in str(e.value)


@pytest.mark.parametrize("estimator", ["reinforce_plus_plus", "remax"])
def test_one_generation_allowed_without_a_group_baseline(estimator):
    check_num_generations(estimator, 1)


def test_check_num_generations_names_other_keys():
    with pytest.raises(ValueError, match=r"algorithm\.adv_estimator='ppo'"):
        check_num_generations("ppo", 4)
    with pytest.raises(ValueError, match=r"model\.grpo\.num_generations=0"):
        check_num_generations("remax", 0)
    check_num_generations("grpo", 2)


# --- GRPO ----------------------------------------------------------------------------------


def test_grpo_hand_worked():
    # group 1: mean 2, unbiased std 1 -> [-1, 0, 1]; group 2 all equal -> 0
    adv = grpo_advantages(_t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, eps=0.0)
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    dr = grpo_advantages(_t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, norm_adv_by_std=False)
    assert dr.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    dr = grpo_advantages(_t([0.0, 4.0]), 2, norm_adv_by_std=False)
    assert dr.tolist() == [-2.0, 2.0]


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("levels", [None, (0.0, 1.0), (0.0, 0.5, 1.0)])
def test_grpo_matches_reference(norm_by_std, levels):
    rng = random.Random(1)
    for n in (2, 3, 4, 8):
        rewards = _random_rewards(rng, 6, n, levels)
        valid = [rng.random() > 0.2 for _ in rewards]
        for v in (None, valid):
            got = grpo_advantages(_t(rewards), n, norm_by_std, valid=None if v is None else torch.tensor(v))
            want = ref_grpo(rewards, n, norm_by_std, v)
            torch.testing.assert_close(got, _t(want), rtol=1e-12, atol=1e-12)


def test_grpo_all_equal_group_is_exactly_zero_even_with_rounding():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive r - mean would leave ~1e-17 residues,
    # which the std division (std ~ 1e-17) would blow up to O(1).
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9, 0.3], dtype=dtype)
        for norm in (True, False):
            adv = grpo_advantages(rewards, 3, norm_adv_by_std=norm, eps=0.0)
            assert not adv.isnan().any()
            assert torch.equal(adv[:6], torch.zeros(6, dtype=adv.dtype))
            assert (adv[6:] != 0).all()


def test_grpo_invalid_samples_ignored_and_zero():
    # NaN where the reward is missing must not leak through the masked statistics.
    rewards = _t([1.0, float("nan"), 3.0, 7.0, float("nan"), 9.0])
    valid = torch.tensor([True, False, True, True, False, False])
    adv = grpo_advantages(rewards, 3, norm_adv_by_std=False, valid=valid)
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # group 2 has one valid sample: 0


def test_grpo_output_dtype_and_shape_errors():
    assert grpo_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="num_generations=3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match=r"\[N\]"):
        grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="valid"):
        grpo_advantages(torch.zeros(4), 2, valid=torch.ones(3, dtype=torch.bool))


# --- RLOO ----------------------------------------------------------------------------------


def test_rloo_hand_worked():
    # baselines: (2+3)/2, (1+3)/2, (1+2)/2
    assert rloo_advantages(_t([1.0, 2.0, 3.0]), 3).tolist() == [-1.5, 0.0, 1.5]
    assert rloo_advantages(_t([4.0, 4.0, 0.0, 1.0]), 2).tolist() == [0.0, 0.0, -1.0, 1.0]


def test_rloo_matches_reference():
    rng = random.Random(2)
    for n in (2, 3, 5):
        for levels in (None, (0.0, 1.0)):
            rewards = _random_rewards(rng, 7, n, levels)
            valid = [rng.random() > 0.25 for _ in rewards]
            for v in (None, valid):
                got = rloo_advantages(_t(rewards), n, valid=None if v is None else torch.tensor(v))
                torch.testing.assert_close(got, _t(ref_rloo(rewards, n, v)), rtol=1e-12, atol=1e-12)


def test_rloo_equals_scaled_group_centring():
    rewards = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dr_grpo = grpo_advantages(rewards, 4, norm_adv_by_std=False)
    torch.testing.assert_close(rloo_advantages(rewards, 4), dr_grpo * 4 / 3)


def test_rloo_all_equal_and_single_valid_are_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 2.0, 5.0, 1.0], dtype=torch.float32)
    valid = torch.tensor([True, True, True, True, False, False])
    adv = rloo_advantages(rewards, 3, valid=valid)
    assert torch.equal(adv, torch.zeros(6))


# --- dynamic sampling filter ------------------------------------------------------------------


def test_groups_with_distinct_rewards():
    rewards = _t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 9.0])
    assert groups_with_distinct_rewards(rewards, 2).tolist() == [False, True, False, True]
    valid = torch.tensor([True, True, True, True, True, True, True, False])
    assert groups_with_distinct_rewards(rewards, 2, valid).tolist() == [False, True, False, False]


# --- broadcast / returns / REINFORCE++ --------------------------------------------------------


def test_broadcast_to_tokens_with_empty_rows():
    adv = torch.tensor([1.5, -2.0, 3.0])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = broadcast_to_tokens(adv, mask)
    assert out.tolist() == [[0, 1.5, 1.5, 0], [0, 0, 0, 0], [3, 3, 3, 3]]
    assert out.dtype == torch.float32


def test_discounted_returns_hand_worked():
    rewards = _t([[9.0, 1.0, 0.0, 2.0, 9.0]])  # positions 0 and 4 are outside the mask
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    got = discounted_returns(rewards, mask, gamma=0.5)
    assert got.tolist() == [[0.0, 1.5, 1.0, 2.0, 0.0]]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_and_reinforce_pp_match_reference(gamma):
    rng = random.Random(4)
    batch, width = 6, 9
    mask = _random_mask(rng, batch, width, empty_rows=(2,))
    rewards = [[rng.gauss(0, 1) for _ in range(width)] for _ in range(batch)]
    want_returns = ref_returns(rewards, mask, gamma)
    got_returns = discounted_returns(_t(rewards), torch.tensor(mask), gamma)
    torch.testing.assert_close(got_returns, _t(want_returns), rtol=1e-12, atol=1e-12)

    got = reinforce_plus_plus_advantages(_t(rewards), torch.tensor(mask, dtype=torch.float64), gamma)
    torch.testing.assert_close(got, _t(ref_whiten(want_returns, mask)), rtol=1e-10, atol=1e-10)
    assert torch.equal(got[2], torch.zeros(width, dtype=torch.float64))


class _ThreadAllReduce:
    """An in-process stand-in for a data-parallel all-reduce: one thread per rank; each call
    waits for every rank's tensor and returns the sum (a new tensor, like a non-in-place hook)."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def run(self, fn, shares):
        results = [None] * self.world

        def worker(rank):
            def all_reduce_sum(t):
                self.slots[rank] = t.clone()
                self.barrier.wait()
                total = sum(self.slots)
                self.barrier.wait()  # everyone has read before the next call overwrites
                return total

            results[rank] = fn(*shares[rank], all_reduce_sum=all_reduce_sum)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def test_reinforce_pp_whitening_over_two_ranks_matches_one_rank():
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    mask = (torch.rand(8, 6, generator=gen) > 0.3).double()
    whole = reinforce_plus_plus_advantages(rewards, mask, 0.95)
    shares = [(rewards[:3], mask[:3]), (rewards[3:], mask[3:])]  # unequal shares
    parts = _ThreadAllReduce(2).run(lambda r, m, all_reduce_sum: reinforce_plus_plus_advantages(
        r, m, 0.95, all_reduce_sum=all_reduce_sum), shares)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_baseline_whitening_over_two_ranks_matches_one_rank():
    gen = torch.Generator().manual_seed(8)
    rewards = torch.randint(0, 3, (8,), generator=gen).double()
    mask = (torch.rand(8, 5, generator=gen) > 0.3).double()
    whole = reinforce_plus_plus_baseline_advantages(rewards, mask, 2)
    shares = [(rewards[:4], mask[:4]), (rewards[4:], mask[4:])]  # whole groups on each rank
    parts = _ThreadAllReduce(2).run(lambda r, m, all_reduce_sum: reinforce_plus_plus_baseline_advantages(
        r, m, 2, all_reduce_sum=all_reduce_sum), shares)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_baseline_matches_reference():
    rng = random.Random(6)
    n, groups, width = 4, 3, 7
    rewards = _random_rewards(rng, groups, n, (0.0, 1.0, 0.5))
    rewards[:n] = [1.0] * n  # one all-equal group
    mask = _random_mask(rng, groups * n, width, empty_rows=(5,))
    valid = [rng.random() > 0.2 for _ in rewards]
    for v in (None, valid):
        got = reinforce_plus_plus_baseline_advantages(
            _t(rewards), torch.tensor(mask), n, valid=None if v is None else torch.tensor(v))
        want = ref_rpp_baseline(rewards, mask, n, v)
        torch.testing.assert_close(got, _t(want), rtol=1e-10, atol=1e-10)
        assert not got.isnan().any()
        if v is not None:
            for i, ok in enumerate(v):
                if not ok:
                    assert torch.equal(got[i], torch.zeros(width, dtype=torch.float64))


# --- ReMax ---------------------------------------------------------------------------------


def test_remax_per_group_and_per_sample_baselines():
    rewards = _t([1.0, 3.0, 0.0, 2.0])
    per_group = _t([2.0, 1.0])
    assert remax_advantages(rewards, per_group, num_generations=2).tolist() == [-1.0, 1.0, -1.0, 1.0]
    per_sample = _t([0.5, 0.5, 0.5, 0.5])
    assert remax_advantages(rewards, per_sample, num_generations=2).tolist() == [0.5, 2.5, -0.5, 1.5]
    assert remax_advantages(rewards, per_sample).tolist() == [0.5, 2.5, -0.5, 1.5]
    valid = torch.tensor([True, False, True, True])
    assert remax_advantages(rewards, per_group, 2, valid).tolist() == [-1.0, 0.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="baseline_rewards"):
        remax_advantages(rewards, _t([1.0, 2.0, 3.0]), 2)


def test_remax_matches_reference():
    rng = random.Random(7)
    n, groups = 3, 5
    rewards = _random_rewards(rng, groups, n)
    greedy = [rng.gauss(0, 1) for _ in range(groups)]
    want = [rewards[i] - greedy[i // n] for i in range(len(rewards))]
    torch.testing.assert_close(remax_advantages(_t(rewards), _t(greedy), n), _t(want), rtol=1e-12, atol=1e-12)


# --- reward transforms ------------------------------------------------------------------------


def test_standardize_rewards():
    r = torch.tensor([1.0, 3.0])
    assert standardize_rewards(r, None) is r
    assert standardize_rewards(r, (1.0, 2.0)).tolist() == [0.0, 1.0]


def test_overlong_reward_penalty():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    got = overlong_reward_penalty(lengths, max_response_length=16, buffer_length=4, penalty_factor=1.0)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_reward_penalty(lengths, 16, 4, 0.5).tolist() == [0.0, 0.0, -0.25, -0.5, -0.5]
    with pytest.raises(ValueError, match="buffer"):
        overlong_reward_penalty(lengths, 16, 0, 1.0)


# --- KL estimators and masks ---------------------------------------------------------------


def test_token_kl_estimators_hand_worked():
    lp, ref = _t([[-1.0, -2.0]]), _t([[-2.0, -1.0]])
    assert token_kl(lp, ref, "k1").tolist() == [[1.0, -1.0]]
    assert token_kl(lp, ref, "abs").tolist() == [[1.0, 1.0]]
    assert token_kl(lp, ref, "k2").tolist() == [[0.5, 0.5]]
    torch.testing.assert_close(token_kl(lp, ref, "k3"), _t([[math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]]))
    with pytest.raises(ValueError, match="k3"):
        token_kl(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_sampled_tokens():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = float(exact_kl(p.log(), q.log()))
    assert exact == pytest.approx(float((p * (p / q).log()).sum()))
    # expectation under p, computed exactly by weighting each token by p
    for est in ("k1", "k3"):
        per_token = token_kl(p.log().unsqueeze(0), q.log().unsqueeze(0), est)[0]
        assert float((p * per_token).sum()) == pytest.approx(exact)
    assert (token_kl(p.log(), q.log(), "k3") >= 0).all()


def test_exact_kl_zero_probabilities():
    log_p = torch.tensor([[0.0, float("-inf")]])
    log_q = torch.tensor([[math.log(0.5), float("-inf")]])
    assert exact_kl(log_p, log_q).tolist() == [pytest.approx(math.log(2))]
    assert exact_kl(log_p, log_p).tolist() == [0.0]


def test_masks():
    assert length_mask(torch.tensor([2, 0, 3]), 3).tolist() == [[True, True, False], [False] * 3, [True] * 3]
    # prompt 2, total 5: tokens 2,3,4 are predicted at positions 1,2,3
    m = response_mask(torch.tensor([2, 3]), torch.tensor([5, 3]), 5)
    assert m.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
