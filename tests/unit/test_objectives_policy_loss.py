"""Clipped policy loss with decoupled clip range and dual clip; loss aggregation modes.

The reference is written per token with the case split on the sign of the advantage (instead of
a max of two terms) and aggregated with explicit Python loops over rows and tokens, in float64;
its gradients come from autograd through those loops.
"""

import math

import pytest
import torch

from aligner.objectives.policy_loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    aggregation_count,
    check_loss_agg_mode,
    clipped_policy_loss,
    loss_sum_and_count,
)
from aligner.objectives.ppo import ppo_policy_loss


def ref_token_loss(logp, old, adv, low, high, c=None):
    ratio = torch.exp(logp - old)
    if adv >= 0:
        loss = -adv * torch.clamp(ratio, max=1 + high)  # -A * min(r, 1+high)
    else:
        loss = -adv * torch.clamp(ratio, min=1 - low)  # -A * max(r, 1-low)
        if c is not None:
            loss = torch.clamp(loss, max=-adv * c)
    return loss


def ref_aggregate(losses, mask, mode, scale=None):
    """losses: list of rows of scalar tensors; mask: list of rows of 0/1."""
    width = len(mask[0])
    if mode == "token-mean":
        total, count = 0.0, 0
        for row_l, row_m in zip(losses, mask):
            for l, m in zip(row_l, row_m):
                if m:
                    total = total + l
                    count += 1
        return total / count if count else torch.zeros((), dtype=torch.float64)
    per_seq = []
    for row_l, row_m in zip(losses, mask):
        selected = [l for l, m in zip(row_l, row_m) if m]
        if not selected:
            continue
        s = sum(selected)
        if mode == "seq-mean-token-mean":
            per_seq.append(s / len(selected))
        elif mode == "seq-mean-token-sum":
            per_seq.append(s)
        else:
            per_seq.append(s / (scale if scale is not None else width))
    return sum(per_seq) / len(per_seq) if per_seq else torch.zeros((), dtype=torch.float64)


def ref_policy_loss(logp, old, adv, mask, low, high, c=None, mode="token-mean", scale=None):
    rows, cols = logp.shape
    losses = [[ref_token_loss(logp[b, t], old[b, t], float(adv[b, t]), low, high, c) for t in range(cols)]
              for b in range(rows)]
    return ref_aggregate(losses, mask.tolist(), mode, scale)


def _inputs(seed, rows=6, cols=7, empty_rows=(2,), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 3).to(dtype)
    old = (logp.double() + torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    adv = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.zeros(rows, cols)
    for b in range(rows):
        if b in empty_rows:
            continue
        start = int(torch.randint(0, cols - 1, (1,), generator=gen))
        stop = int(torch.randint(start + 1, cols + 1, (1,), generator=gen))
        mask[b, start:stop] = 1
    return logp, old, adv, mask


# --- aggregation ---------------------------------------------------------------------------


def test_aggregation_hand_worked():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the last row is empty
    assert float(aggregate_loss(loss, mask, "token-mean")) == 10 / 4
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == (2 + 4) / 2
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum")) == (6 + 4) / 2
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm")) == (6 / 4 + 4 / 4) / 2
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=8)) == (6 / 8 + 4 / 8) / 2
    assert float(aggregation_count(mask, "token-mean")) == 4
    assert float(aggregation_count(mask, "seq-mean-token-sum")) == 2
    assert float(aggregate_loss(loss, mask, "token-mean", global_count=20)) == 10 / 20


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_empty_mask_gives_zero_not_nan(mode):
    loss = torch.full((2, 3), float("nan"))  # masked-out values never reach the result
    got = aggregate_loss(loss, torch.zeros(2, 3), mode)
    assert got.item() == 0.0


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.loss_agg_mode='mean'"):
        check_loss_agg_mode("mean")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "sum")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_sum_and_count_compose_to_the_aggregate(mode):
    _, _, loss, mask = _inputs(0)
    numerator, count = loss_sum_and_count(loss, mask, mode, loss_scale_factor=5)
    torch.testing.assert_close(numerator / count, aggregate_loss(loss, mask, mode, loss_scale_factor=5))


# --- clipped policy loss -----------------------------------------------------------------------


def test_clip_higher_hand_worked():
    logp = torch.tensor([[math.log(1.25), math.log(0.7)]])
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # symmetric 0.2: ratio 1.25 clipped to 1.2 for A>0; ratio 0.7 clipped to 0.8 for A<0
    sym, m = clipped_policy_loss(logp, old, adv, mask, 0.2)
    assert float(sym) == pytest.approx((-1.2 + 0.8) / 2)
    assert float(m["clip_fraction"]) == 1.0
    # clip-higher 0.28: 1.25 is inside the range now
    dapo, m = clipped_policy_loss(logp, old, adv, mask, 0.2, clip_ratio_high=0.28)
    assert float(dapo) == pytest.approx((-1.25 + 0.8) / 2)
    assert float(m["clip_fraction"]) == 0.5


def test_dual_clip_hand_worked():
    logp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, _ = clipped_policy_loss(logp, old, adv, mask, 0.2)
    dual, m = clipped_policy_loss(logp, old, adv, mask, 0.2, clip_ratio_c=3.0)
    # token 0: -A*r = 5 capped at 3; token 1: 2 < 3 untouched; token 2 (A>0): -1.2 untouched
    assert float(plain) == pytest.approx((5 + 2 - 1.2) / 3)
    assert float(dual) == pytest.approx((3 + 2 - 1.2) / 3)
    assert float(m["dual_clip_fraction"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        clipped_policy_loss(logp, old, adv, mask, 0.2, clip_ratio_c=1.0)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("low,high,c", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
def test_policy_loss_matches_reference_values_and_gradients(mode, low, high, c):
    logp, old, adv, mask = _inputs(1)
    logp_a = logp.clone().requires_grad_()
    got, _ = clipped_policy_loss(logp_a, old, adv, mask, low, high, c, loss_agg_mode=mode, loss_scale_factor=5)
    (grad,) = torch.autograd.grad(got, logp_a)
    logp_b = logp.clone().requires_grad_()
    want = ref_policy_loss(logp_b, old, adv, mask, low, high, c, mode, scale=5)
    (want_grad,) = torch.autograd.grad(want, logp_b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))  # the empty row


def test_ppo_policy_loss_is_the_symmetric_token_mean_case():
    logp, old, adv, mask = _inputs(2, dtype=torch.float32)
    a, ma = ppo_policy_loss(logp, old, adv, mask, 0.2)
    b, mb = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2, loss_agg_mode="token-mean")
    assert torch.equal(a, b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_metrics_are_detached_and_float32_for_bf16():
    logp, old, adv, mask = _inputs(3, dtype=torch.bfloat16)
    loss, metrics = clipped_policy_loss(logp.requires_grad_(), old, adv, mask, 0.2, 0.28)
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in metrics.values())


# --- split invariance -------------------------------------------------------------------------


def _summed_grad(logp, old, adv, mask, splits, mode, global_count):
    """Gradient w.r.t. all of logp, summing each piece's loss gradient (gradient accumulation
    over micro-batches, and a summing all-reduce over data-parallel ranks)."""
    logp = logp.clone().requires_grad_()
    total = torch.zeros_like(logp)
    for rows in splits:
        loss, _ = clipped_policy_loss(logp[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28,
                                      loss_agg_mode=mode, global_count=global_count)
        (g,) = torch.autograd.grad(loss, logp)
        total += g
    return total


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_global_count_makes_any_split_give_the_same_gradient(mode):
    # Rows of very different lengths, so that a local denominator would change the update.
    logp, old, adv, mask = _inputs(4, rows=8, cols=12, empty_rows=(5,), dtype=torch.float32)
    mask[0] = 1
    mask[1, 1:] = 0
    whole = [slice(0, 8)]
    micro_2x4 = [slice(0, 4), slice(4, 8)]
    # DP=2, each rank 2 micro-batches of 2 rows: the pieces a 2-rank x 2-micro-batch step sees
    dp2_micro2 = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    # the global denominator: per-piece counts summed (what an all-reduce of them gives)
    global_count = sum(aggregation_count(mask[rows], mode) for rows in micro_2x4)

    reference = _summed_grad(logp, old, adv, mask, whole, mode, None)
    for splits in (whole, micro_2x4, dp2_micro2):
        got = _summed_grad(logp, old, adv, mask, splits, mode, global_count)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)

    # Without the global count every piece is its own mean: the 2x4 update is a different one.
    local = _summed_grad(logp, old, adv, mask, micro_2x4, mode, None)
    assert (local - reference).abs().max() > 1e-3
