"""PPO maths: reward shaping, GAE, clipped policy/value losses, KL estimates.

GAE is checked against hand-worked rows and against the closed form
``A_t = sum_l (gamma*lam)^l delta_{t+l}`` (a matrix product per row, not a backward recursion);
the clipped losses against a reference written with the case split on the sign of the advantage
(``-A*min(r, 1+eps)`` for A >= 0, ``-A*max(r, 1-eps)`` otherwise) instead of max-of-two-terms.
"""

import math

import pytest
import torch

from aligner.objectives.ppo import (
    approx_kl_k3,
    clipped_value_loss,
    entropy_bonus,
    generalized_advantage_estimation,
    kl_penalty,
    last_token_index,
    ppo_policy_loss,
    shape_rewards,
)


def _span_mask(batch, length, gen):
    """Rows of the form 0..0 1..1 0..0 (prompt, response, padding); some rows empty."""
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        start = int(torch.randint(0, length, (1,), generator=gen))
        stop = int(torch.randint(start, length + 1, (1,), generator=gen))
        mask[b, start:stop] = 1
    return mask


# --- kl_penalty / shape_rewards -------------------------------------------------------------


def test_kl_penalty_hand_worked():
    lp = torch.tensor([[-1.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, use_absolute_kl=False), torch.tensor([[1.0, -2.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, use_absolute_kl=True), torch.tensor([[1.0, 2.0]]))


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, -1, 1]


def test_shape_rewards_hand_worked():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -2.0, -1.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -0.5, -9.0, -9.0], [-9.0, -9.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])  # ends at 1, ends at 3, empty
    scores = torch.tensor([10.0, 20.0, 30.0])

    rewards, kl = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.5, use_absolute_kl=False)
    # logp - ref on the mask: row 0 (1, -0.5), row 1 (1, -2); zero elsewhere.
    torch.testing.assert_close(kl, torch.tensor([[1.0, -0.5, 0, 0], [0, 0, 1.0, -2.0], [0, 0, 0, 0]]))
    torch.testing.assert_close(
        rewards,
        torch.tensor([[-0.5, 0.25 + 10.0, 0, 0], [0, 0, -0.5, 1.0 + 20.0], [0, 0, 0, 0]]),
    )

    rewards_abs, kl_abs = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.5, use_absolute_kl=True)
    torch.testing.assert_close(kl_abs, kl.abs())
    torch.testing.assert_close(
        rewards_abs,
        torch.tensor([[-0.5, -0.25 + 10.0, 0, 0], [0, 0, -0.5, -1.0 + 20.0], [0, 0, 0, 0]]),
    )


def test_shape_rewards_matches_loop_reference_and_gradient():
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 7
    lp = -torch.rand(B, T, generator=gen, dtype=torch.float64)
    ref = -torch.rand(B, T, generator=gen, dtype=torch.float64)
    mask = _span_mask(B, T, gen)
    scores = torch.randn(B, generator=gen, dtype=torch.float64, requires_grad=True)
    rewards, _ = shape_rewards(scores, lp, ref, mask, kl_coef=0.05, use_absolute_kl=False)

    expected = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                expected[b, t] = -0.05 * (lp[b, t] - ref[b, t])
                last = t
        if last is not None:
            expected[b, last] += scores[b].item()
    torch.testing.assert_close(rewards.detach(), expected)

    (grad,) = torch.autograd.grad(rewards.sum(), scores)
    torch.testing.assert_close(grad, (mask.sum(-1) > 0).double())


def test_shape_rewards_bf16():
    lp = torch.full((1, 3), -1.0, dtype=torch.bfloat16)
    rewards, kl = shape_rewards(torch.tensor([1.0], dtype=torch.bfloat16), lp, lp, torch.ones(1, 3), 0.1, False)
    assert rewards.dtype == torch.float32 and kl.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0]]))


# --- GAE ------------------------------------------------------------------------------------


def _gae(rewards, values, mask, gamma, lam):
    return generalized_advantage_estimation(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(mask),
        gamma,
        lam,
    )


def test_gae_required_hand_worked_case():
    # gamma 0.5, lam 0 -> A_t = delta_t = r_t + 0.5 V_{t+1} - V_t, V_4 = 0:
    # A_3 = 0 + 0 - 3 = -3; A_2 = 1 + 1.5 - 2 = 0.5; A_1 = 0 + 1 - 1 = 0; A_0 = 0 + 0.5 - 0 = 0.5
    adv, ret = _gae([[0.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 2.0, 3.0]], [[1, 1, 1, 1]], gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.5, -3.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 1.0, 2.5, 0.0]], dtype=torch.float64))


def test_gae_monte_carlo_case():
    # gamma 1, lam 1: A_t = (sum of rewards from t) - V_t, so returns are the reward-to-go.
    # V = (1, 2, 3), r = (0, 0, 5): deltas (0+2-1, 0+3-2, 5+0-3) = (1, 1, 2);
    # A_2 = 2, A_1 = 1 + 2 = 3, A_0 = 1 + 3 = 4; returns (5, 5, 5).
    adv, ret = _gae([[0.0, 0.0, 5.0]], [[1.0, 2.0, 3.0]], [[1, 1, 1]], gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[4.0, 3.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[5.0, 5.0, 5.0]], dtype=torch.float64))


def test_gae_padded_and_late_start_rows_in_one_batch():
    rewards = [
        [1.0, 2.0, 9.0, 9.0],  # response then padding: the 9s must be ignored
        [9.0, 9.0, 0.0, 3.0],  # prompt then response: the 9s must be ignored
    ]
    values = [
        [0.5, 1.0, 7.0, 7.0],
        [9.0, 9.0, 2.0, 1.0],
    ]
    mask = [[1, 1, 0, 0], [0, 0, 1, 1]]
    adv, ret = _gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0, gamma 0.9, lam 0.5, V past position 1 is 0:
    #   A_1 = 2 + 0.9*0 - 1 = 1
    #   A_0 = (1 + 0.9*1 - 0.5) + 0.9*0.5*1 = 1.4 + 0.45 = 1.85
    #   returns = A + V = (2.35, 2.0), then zeros
    # Row 1, same gamma/lam:
    #   A_3 = 3 + 0 - 1 = 2
    #   A_2 = (0 + 0.9*1 - 2) + 0.45*2 = -1.1 + 0.9 = -0.2
    #   prompt positions get 0; returns (0, 0, 1.8, 3.0)
    torch.testing.assert_close(adv, torch.tensor([[1.85, 1.0, 0, 0], [0, 0, -0.2, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.35, 2.0, 0, 0], [0, 0, 1.8, 3.0]], dtype=torch.float64))


def test_gae_empty_row_is_all_zero():
    adv, ret = _gae([[1.0, 2.0]], [[3.0, 4.0]], [[0, 0]], gamma=1.0, lam=0.95)
    assert torch.equal(adv, torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(ret, torch.zeros(1, 2, dtype=torch.float64))


def _gae_closed_form(rewards, values, mask, gamma, lam):
    """A = D @ delta per row, D[t, s] = (gamma*lam)^(s - t) for t <= s inside the response."""
    B, T = rewards.shape
    advantages = []
    for b in range(B):
        idx = mask[b].nonzero().flatten().tolist()
        row = torch.zeros(T, dtype=torch.float64)
        if idx:
            lo, hi = idx[0], idx[-1] + 1
            v = values[b, lo:hi]
            v_next = torch.cat([v[1:], v.new_zeros(1)])
            delta = rewards[b, lo:hi] + gamma * v_next - v
            n = hi - lo
            steps = torch.arange(n, dtype=torch.float64)
            exponent = steps.view(1, -1) - steps.view(-1, 1)
            discount = torch.where(exponent >= 0, (gamma * lam) ** exponent.clamp(min=0), 0.0)
            row = torch.cat([row[:lo], discount @ delta, row[hi:]])
        advantages.append(row)
    adv = torch.stack(advantages)
    return adv, adv + values * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.8, 0.0), (0.9, 0.7)])
def test_gae_matches_closed_form_values_and_gradients(gamma, lam):
    gen = torch.Generator().manual_seed(int(100 * gamma + 10 * lam))
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = _span_mask(B, T, gen)
    mask[0] = 1  # at least one full row

    adv, ret = generalized_advantage_estimation(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_closed_form(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)

    w_a = torch.randn(B, T, generator=gen, dtype=torch.float64)
    w_r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((adv * w_a + ret * w_r).sum(), (rewards, values))
    ref_grads = torch.autograd.grad((ref_adv * w_a + ref_ret * w_r).sum(), (rewards, values))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_gae_bf16_inputs_give_float32():
    adv, ret = generalized_advantage_estimation(
        torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16),
        torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16),
        torch.ones(1, 2),
        gamma=1.0,
        lam=1.0,
    )
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    # A_1 = 1 - 0.25 = 0.75; A_0 = (0 + 0.25 - 0.5) + 0.75 = 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75]]))


# --- policy loss ----------------------------------------------------------------------------


def _reference_policy_loss(logprobs, old, adv, mask, eps):
    ratio = torch.exp(logprobs - old)
    per_token = torch.where(
        adv >= 0,
        -adv * torch.minimum(ratio, torch.full_like(ratio, 1 + eps)),
        -adv * torch.maximum(ratio, torch.full_like(ratio, 1 - eps)),
    )
    m = mask.double()
    return (per_token * m).sum() / m.sum()


def test_policy_loss_on_policy_hand_worked():
    # ratio 1 everywhere: loss = -mean(A) over the mask; gradient -A / N on the mask.
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = ppo_policy_loss(lp, lp.detach(), adv, mask, ratio_eps=0.2)
    assert loss.item() == pytest.approx(-0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.5, 0.0]]))
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["ratio_mean"].item() == 1.0


def test_policy_loss_clipping_hand_worked():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1:
    #  (1.5, A=+1): clipped at 1.2 -> -1.2, no gradient (the update already went far enough)
    #  (1.5, A=-1): max(1.5, 1.2) -> +1.5, gradient flows (the update went the wrong way)
    #  (0.5, A=+1): min(0.5, 1.2) -> -0.5, gradient flows
    #  (0.5, A=-1): clipped at 0.8 -> +0.8, no gradient
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = ppo_policy_loss(lp, old, adv, torch.ones(1, 4), eps)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    (grad,) = torch.autograd.grad(loss, lp)
    # d(-A r)/d logp = -A r, / 4
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]))
    assert metrics["clip_fraction"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    # k3 of KL(old || new), tokens sampled from old: log(new / old) = log(ratio),
    # k3 = ratio - 1 - log(ratio)
    k3 = [r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5)]
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 4, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_policy_loss_matches_reference_values_and_gradients(eps):
    gen = torch.Generator().manual_seed(int(eps * 100))
    B, T = 4, 6
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    lp = (old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = _span_mask(B, T, gen)
    mask[0] = 1

    loss, metrics = ppo_policy_loss(lp, old, adv, mask, eps)
    ref_lp = lp.detach().clone().requires_grad_()
    ref = _reference_policy_loss(ref_lp, old, adv, mask, eps)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(ref, ref_lp)[0])

    sel = mask.bool()
    ratios = torch.exp(lp.detach() - old)[sel].tolist()
    assert metrics["clip_fraction"].item() == pytest.approx(sum(abs(r - 1) > eps for r in ratios) / len(ratios))
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert metrics["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / len(ratios))


def test_policy_loss_empty_mask_and_bf16():
    lp = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    loss, metrics = ppo_policy_loss(lp, lp.detach(), torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3), 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad, torch.zeros(2, 3, dtype=torch.bfloat16))
    assert all(torch.isfinite(v) for v in metrics.values())


# --- value loss -----------------------------------------------------------------------------


def test_value_loss_hand_worked():
    clip = 0.5
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[2.0, 2.0, 0.2, 9.0]], requires_grad=True)
    returns = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # pos 0: V 2 (clipped 0.5), R 3: max(1, 6.25) = 6.25 (clipped term, no gradient)
    # pos 1: V 2 (clipped 0.5), R 0: max(4, 0.25) = 4 (unclipped, gradient 2 (V - R) = 4)
    # pos 2: V 0.2 inside the clip range, R 1: 0.64 (gradient 2 * -0.8 = -1.6)
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip)
    assert loss.item() == pytest.approx(0.5 * (6.25 + 4 + 0.64) / 3)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, 0.5 * torch.tensor([[0.0, 4.0, -1.6, 0.0]]) / 3)
    assert metrics["value_clip_fraction"].item() == pytest.approx(2 / 3)

    unclipped, metrics_off = clipped_value_loss(values, old, returns, mask, None)
    assert unclipped.item() == pytest.approx(0.5 * (1 + 4 + 0.64) / 3)
    assert metrics_off["value_clip_fraction"].item() == 0.0


def test_value_loss_matches_reference_values_and_gradients():
    gen = torch.Generator().manual_seed(7)
    B, T, clip = 5, 6, 0.3
    old = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = (old + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = _span_mask(B, T, gen)
    mask[0] = 1
    loss, _ = clipped_value_loss(values, old, returns, mask, clip)

    ref_values = values.detach().clone().requires_grad_()
    terms = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                v, o, r = ref_values[b, t], old[b, t].item(), returns[b, t].item()
                v_clip = torch.clamp(v, o - clip, o + clip)
                terms.append(torch.maximum((v - r) ** 2, (v_clip - r) ** 2))
    ref = 0.5 * torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(ref, ref_values)[0])


def test_value_loss_empty_mask():
    values = torch.ones(1, 2, requires_grad=True)
    loss, metrics = clipped_value_loss(values, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.2)
    assert loss.item() == 0.0 and metrics["value_clip_fraction"].item() == 0.0
    assert torch.equal(torch.autograd.grad(loss, values)[0], torch.zeros(1, 2))


# --- entropy bonus and k3 -------------------------------------------------------------------


def test_entropy_bonus_is_masked_mean():
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert entropy_bonus(entropy, mask).item() == pytest.approx(2.0)
    assert entropy_bonus(entropy, torch.zeros(2, 3)).item() == 0.0


def test_approx_kl_k3_hand_worked_and_unbiased():
    # p(token) = 1/2 under the sampler, 1/4 under q: log r = ln(1/4) - ln(1/2) = -ln 2,
    # k3 = e^{-ln 2} - 1 + ln 2 = ln 2 - 1/2.
    lp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    assert approx_kl_k3(lp, ref, torch.ones(1, 1)).item() == pytest.approx(math.log(2) - 0.5)
    assert approx_kl_k3(lp, lp, torch.ones(1, 1)).item() == 0.0

    # Averaged over every outcome weighted by p, k3 equals the exact KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    weighted = approx_kl_k3(p.log().view(1, -1), q.log().view(1, -1), p.view(1, -1))
    assert weighted.item() == pytest.approx(exact, rel=1e-12)
