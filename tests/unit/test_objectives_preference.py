"""Bradley-Terry and DPO-family losses.

Value references are plain Python ``math`` per pair (Bernoulli KLs written as p*log(p/q), not
with logsigmoid); gradient references are float64 torch written the naive way (sigmoid, then
log), which is fine for the moderate inputs they are used on. Huge margins are checked only for
finiteness, which is exactly where the naive forms would fail.
"""

import math

import pytest
import torch

from aligner.objectives.preference import PREFERENCE_LOSS_TYPES, bradley_terry_loss, preference_loss


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x):
    # log(1 + e^x), stable for the moderate values used here
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _reference_pair_loss(delta, gt_delta, beta, loss_type):
    if loss_type == "dpo":
        return _softplus(-beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "rpo_sq":
        return (beta * delta - gt_delta) ** 2
    model_p, gt_p = _sigmoid(beta * delta), _sigmoid(gt_delta)
    if loss_type == "rpo_fwd_kl":
        return _bernoulli_kl(model_p, gt_p)
    return _bernoulli_kl(gt_p, model_p)


def _naive_torch_loss(pc, pr, rc, rr, gc, gr, beta, loss_type, scale):
    """float64 torch reference used only for gradients."""
    delta = (pc - rc) - (pr - rr)
    gt_delta = scale * (gc - gr)
    if loss_type == "dpo":
        per = -torch.log(torch.sigmoid(beta * delta))
    elif loss_type == "ipo":
        per = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "rpo_sq":
        per = (beta * delta - gt_delta) ** 2
    else:
        p, q = torch.sigmoid(beta * delta), torch.sigmoid(gt_delta)
        if loss_type == "rpo_bwd_kl":
            p, q = q, p
        per = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    return per.mean()


def _random_pairs(seed, batch=6):
    gen = torch.Generator().manual_seed(seed)
    logps = [-(20 * torch.rand(batch, generator=gen, dtype=torch.float64) + 1) for _ in range(4)]
    gt = [3 * torch.randn(batch, generator=gen, dtype=torch.float64) for _ in range(2)]
    return logps, gt


# --- Bradley-Terry --------------------------------------------------------------------------


def test_bradley_terry_hand_worked():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # margins (1, 0, -1): -log sigmoid(m) = log(1 + e^-m)
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.e)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(0.5)  # 1 + 0.5 (tie) + 0, over 3
    assert metrics["reward_margin"].item() == pytest.approx(0.0)
    assert metrics["chosen_reward_mean"].item() == pytest.approx(1.0)
    assert metrics["rejected_reward_mean"].item() == pytest.approx(1.0)
    assert metrics["reward_mean"].item() == pytest.approx(1.0)
    # all six rewards (1, 0, 2, 0, 0, 3): squares about the mean 0 + 1 + 1 + 1 + 1 + 4 = 8; / 5
    assert metrics["reward_std"].item() == pytest.approx(math.sqrt(8 / 5), rel=1e-6)
    assert all(not v.requires_grad for v in metrics.values())


def test_bradley_terry_values_and_gradients_match_reference():
    gen = torch.Generator().manual_seed(0)
    chosen = (2 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_()
    rejected = (2 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_()
    loss, _ = bradley_terry_loss(chosen, rejected)
    margins = (chosen - rejected).tolist()
    assert loss.item() == pytest.approx(sum(_softplus(-m) for m in margins) / 8, rel=1e-12)

    g_c, g_r = torch.autograd.grad(loss, (chosen, rejected))
    # d/dc of softplus(-(c - r)) / B = -sigmoid(-(c - r)) / B
    expected = torch.tensor([-_sigmoid(-m) / 8 for m in margins], dtype=torch.float64)
    torch.testing.assert_close(g_c, expected)
    torch.testing.assert_close(g_r, -expected)


def test_bradley_terry_huge_margins_are_finite():
    chosen = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # pair 0 ~ 0, pair 1 ~ 2e4, pair 2 log 2
    assert loss.item() == pytest.approx((2e4 + math.log(2)) / 3, rel=1e-6)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_bradley_terry_bf16_inputs():
    chosen = torch.tensor([0.5, 1.5], dtype=torch.bfloat16)
    rejected = torch.tensor([0.25, 2.0], dtype=torch.bfloat16)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((_softplus(-0.25) + _softplus(0.5)) / 2, rel=1e-6)
    assert metrics["accuracy"].dtype == torch.float32


# --- preference_loss ------------------------------------------------------------------------


def test_policy_equal_to_reference_hand_worked():
    logps = torch.tensor([-3.0, -5.0])
    pc = logps.clone().requires_grad_()
    beta = 0.1
    loss, metrics = preference_loss(pc, logps, logps, logps, beta=beta, loss_type="dpo")
    assert loss.item() == pytest.approx(math.log(2))
    # d/d pc of -log sigmoid(beta * delta) at delta = 0 is -beta * sigmoid(0) = -beta / 2, / B
    (grad,) = torch.autograd.grad(loss, pc)
    torch.testing.assert_close(grad, torch.full((2,), -beta / 4))
    assert metrics["preference_accuracy"].item() == 0.0  # ties count as wrong
    assert metrics["implicit_reward_margin"].item() == 0.0
    assert metrics["chosen_logps"].item() == pytest.approx(-4.0)

    ipo, _ = preference_loss(logps, logps, logps, logps, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx(1 / (4 * beta**2))  # (0 - 1/(2 beta))^2


def test_metrics_hand_worked():
    loss, metrics = preference_loss(
        policy_chosen_logps=torch.tensor([-1.0, -4.0]),
        policy_rejected_logps=torch.tensor([-3.0, -2.0]),
        ref_chosen_logps=torch.tensor([-2.0, -4.0]),
        ref_rejected_logps=torch.tensor([-2.0, -3.0]),
        beta=0.5,
        loss_type="dpo",
    )
    # r_c = (1, 0), r_r = (-1, 1), delta = (2, -1)
    assert metrics["preference_accuracy"].item() == 0.5
    assert metrics["implicit_reward_margin"].item() == pytest.approx(0.5 * (2 - 1) / 2)
    assert metrics["chosen_implicit_reward"].item() == pytest.approx(0.25)
    assert metrics["rejected_implicit_reward"].item() == pytest.approx(0.0)
    assert metrics["chosen_logps"].item() == pytest.approx(-2.5)
    assert metrics["rejected_logps"].item() == pytest.approx(-2.5)
    assert loss.item() == pytest.approx((_softplus(-1.0) + _softplus(0.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("beta,scale", [(0.1, 1.0), (0.7, 0.3)])
def test_losses_match_reference_values_and_gradients(loss_type, beta, scale):
    (pc, pr, rc, rr), (gc, gr) = _random_pairs(seed=10 * PREFERENCE_LOSS_TYPES.index(loss_type) + int(10 * beta))
    inputs = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    loss, _ = preference_loss(*inputs, beta=beta, loss_type=loss_type,
                              chosen_gt_rewards=gc, rejected_gt_rewards=gr, gt_reward_scale=scale)
    assert loss.dtype == torch.float64

    expected = sum(
        _reference_pair_loss((a - c) - (b - d), scale * (g - h), beta, loss_type)
        for a, b, c, d, g, h in zip(*(t.tolist() for t in (pc, pr, rc, rr, gc, gr)))
    ) / len(pc)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)

    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    ref_loss = _naive_torch_loss(*ref_inputs, gc, gr, beta, loss_type, scale)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_rpo_losses_vanish_when_implicit_gap_equals_ground_truth(loss_type):
    beta, scale = 0.5, 2.0
    gc, gr = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    # Choose policy logps so beta * delta = scale * (gc - gr) = (2, -2): delta = (4, -4).
    ref = torch.zeros(2)
    pc = torch.tensor([4.0, -4.0], requires_grad=True)
    loss, _ = preference_loss(pc, ref, ref, ref, beta, loss_type, gc, gr, gt_reward_scale=scale)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, pc)
    torch.testing.assert_close(grad, torch.zeros(2), atol=1e-7, rtol=0)


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_huge_margins_give_finite_values_and_gradients(loss_type, beta):
    # |delta| = 1e4 both ways, with ground-truth gaps that agree, disagree, or are huge too.
    pc = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], requires_grad=True)
    pr = torch.zeros(5, requires_grad=True)
    ref = torch.zeros(5)
    gc = torch.tensor([1e4, 1e4, -1e4, -1e4, 1e4])
    gr = torch.zeros(5)
    loss, metrics = preference_loss(pc, pr, ref, ref, beta, loss_type, gc, gr)
    assert torch.isfinite(loss)
    grads = torch.autograd.grad(loss, (pc, pr))
    for g in grads:
        assert torch.isfinite(g).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_dpo_huge_margin_value_is_right():
    # -log sigmoid(-1e3) = 1e3 (+ e^-1000); -log sigmoid(1e3) ~ 0
    pc = torch.tensor([-1e4, 1e4])
    zero = torch.zeros(2)
    loss, _ = preference_loss(pc, zero, zero, zero, beta=0.1, loss_type="dpo")
    assert loss.item() == pytest.approx(500.0, rel=1e-6)


def test_bf16_inputs_compute_in_float32():
    gen = torch.Generator().manual_seed(3)
    logps = [-(5 * torch.rand(4, generator=gen)).to(torch.bfloat16) for _ in range(4)]
    loss, metrics = preference_loss(*logps, beta=0.2, loss_type="dpo")
    assert loss.dtype == torch.float32
    assert metrics["chosen_logps"].dtype == torch.float32
    pc, pr, rc, rr = (t.double().tolist() for t in logps)
    expected = sum(_softplus(-0.2 * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_type_names_config_key_and_choices():
    x = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        preference_loss(x, x, x, x, beta=0.1, loss_type="dpo_typo")
    message = str(err.value)
    assert "model.dpo.preference_loss" in message
    assert "dpo_typo" in message
    for name in PREFERENCE_LOSS_TYPES:
        assert name in message


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_rpo_without_ground_truth_rewards_is_explained(loss_type):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="ground-truth") as err:
        preference_loss(x, x, x, x, beta=0.1, loss_type=loss_type)
    assert "model.dpo.preference_loss" in str(err.value)
    with pytest.raises(ValueError, match="rejected_gt_rewards"):
        preference_loss(x, x, x, x, beta=0.1, loss_type=loss_type, chosen_gt_rewards=x)


def test_dpo_and_ipo_ignore_ground_truth_rewards():
    x = torch.tensor([-1.0, -2.0])
    y = torch.tensor([-2.0, -1.0])
    for loss_type in ("dpo", "ipo"):
        plain, _ = preference_loss(x, y, y, x, 0.3, loss_type)
        with_gt, _ = preference_loss(x, y, y, x, 0.3, loss_type, torch.ones(2), torch.zeros(2))
        assert plain.item() == with_gt.item()
