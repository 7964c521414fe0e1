"""Masked reductions: hand-worked values, numpy float64 references on the selected entries,
empty masks, garbage at masked positions, bf16 inputs, and the data-parallel statistics with
several simulated ranks (threads meeting at a barrier, so the sums really cross "ranks")."""

import math
import threading

import numpy as np
import pytest
import torch

from aligner.objectives.masked import (
    masked_global_mean_var,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten_with,
)


def _random(seed, shape=(4, 7), p_keep=0.6):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=gen, dtype=torch.float64) + 1.5
    mask = (torch.rand(*shape, generator=gen) < p_keep).long()
    return x, mask


def test_hand_worked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_sum(x, mask).item() == 4.0
    assert masked_mean(x, mask).item() == 2.0
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([4.0, 0.0]))
    # Row 1 selects nothing: 0, not NaN.
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([1.0, 0.0, 3.0]))


def test_bool_and_float_masks_agree():
    x, mask = _random(0)
    for m in (mask.bool(), mask.float(), mask):
        torch.testing.assert_close(masked_mean(x, m), torch.tensor(x.numpy()[mask.numpy() == 1].mean(), dtype=torch.float64))


def test_float_mask_acts_as_weight():
    x = torch.tensor([2.0, 4.0, 100.0])
    w = torch.tensor([1.0, 3.0, 0.0])
    # (1*2 + 3*4) / (1 + 3)
    assert masked_mean(x, w).item() == pytest.approx(3.5)


def test_all_zero_mask_gives_zero_value_and_zero_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    for fn in (masked_sum, masked_mean, masked_var):
        out = fn(x, mask)
        assert out.item() == 0.0, fn.__name__
        (grad,) = torch.autograd.grad(out, x)
        assert torch.equal(grad, torch.zeros(3, 4)), fn.__name__
    assert torch.equal(masked_whiten(x, mask), torch.zeros(3, 4))
    mean, var = masked_global_mean_var(x, mask)
    assert mean.item() == 0.0 and var.item() == 0.0


def test_inf_and_nan_at_masked_positions_do_not_leak():
    x = torch.tensor([[1.0, float("inf"), 3.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0]])
    mean = masked_mean(x, mask)
    assert mean.item() == 2.0
    assert masked_var(x, mask).item() == pytest.approx(2.0)  # ((1-2)^2 + (3-2)^2) / (2 - 1)
    (grad,) = torch.autograd.grad(mean, x)
    torch.testing.assert_close(grad, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))
    assert torch.isfinite(masked_whiten(x, mask)).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_match_numpy_reference_values_and_gradients(seed):
    x, mask = _random(seed)
    x.requires_grad_()
    selected = x.detach().numpy()[mask.numpy() == 1]
    n = selected.size

    torch.testing.assert_close(masked_sum(x, mask).detach(), torch.tensor(selected.sum(), dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask).detach(), torch.tensor(selected.mean(), dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask).detach(), torch.tensor(selected.var(ddof=1), dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False).detach(),
                               torch.tensor(selected.var(ddof=0), dtype=torch.float64))
    row_means = [x.detach().numpy()[b][mask.numpy()[b] == 1].mean() for b in range(x.shape[0])]
    torch.testing.assert_close(masked_mean(x, mask, dim=-1).detach(), torch.tensor(row_means, dtype=torch.float64))

    # Analytic gradients: d mean / dx_i = m_i / n; d var_unbiased / dx_i = 2 m_i (x_i - mean) / (n - 1).
    m = mask.double()
    (g_mean,) = torch.autograd.grad(masked_mean(x, mask), x)
    torch.testing.assert_close(g_mean, m / n)
    (g_var,) = torch.autograd.grad(masked_var(x, mask), x)
    torch.testing.assert_close(g_var, 2 * m * (x.detach() - selected.mean()) / (n - 1))


def test_var_of_single_element_is_zero_when_unbiased():
    x = torch.tensor([5.0, 7.0])
    mask = torch.tensor([0, 1])
    assert masked_var(x, mask, unbiased=True).item() == 0.0
    assert masked_var(x, mask, unbiased=False).item() == 0.0


def test_per_row_variance():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # Row 0: {1, 3}: unbiased var 2. Row 1: {2, 2, 8}: mean 4, squares 4 + 4 + 16 = 24, / 2 = 12.
    torch.testing.assert_close(masked_var(x, mask, dim=-1), torch.tensor([2.0, 12.0]))


def test_whiten_hand_worked():
    x = torch.tensor([[1.0, 3.0, 42.0]])
    mask = torch.tensor([[1, 1, 0]])
    # mean 2, unbiased var 2 -> (x - 2) / sqrt(2); masked position -> 0
    s = 1 / math.sqrt(2.0)
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), torch.tensor([[-s, s, 0.0]]))
    # shift_mean=False only rescales around the original mean.
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[2 - s, 2 + s, 0.0]]))


@pytest.mark.parametrize("seed", [5, 6])
def test_whitened_selection_has_zero_mean_unit_variance(seed):
    x, mask = _random(seed)
    out = masked_whiten(x, mask, eps=0.0).numpy()
    sel = out[mask.numpy() == 1]
    assert abs(sel.mean()) < 1e-12
    assert sel.var(ddof=1) == pytest.approx(1.0, rel=1e-12)
    assert (out[mask.numpy() == 0] == 0).all()


def test_whiten_with_given_statistics():
    x = torch.tensor([[3.0, 5.0], [7.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = whiten_with(x, mask, mean=torch.tensor(1.0), var=torch.tensor(4.0), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))


def test_bf16_inputs_reduce_in_float32():
    # 3000 copies of 1.0 and one 1/256: a bf16 accumulator would stall long before 3000.
    x = torch.ones(3001, dtype=torch.bfloat16)
    x[-1] = 1 / 256
    mask = torch.ones(3001)
    total = masked_sum(x, mask)
    assert total.dtype == torch.float32
    assert total.item() == 3000 + 1 / 256
    assert masked_mean(x, mask).dtype == torch.float32
    assert masked_whiten(x.view(1, -1), mask.view(1, -1)).dtype == torch.float32


def test_float64_inputs_stay_float64():
    x, mask = _random(7)
    assert masked_mean(x, mask).dtype == torch.float64
    assert masked_whiten(x, mask).dtype == torch.float64


# --- masked_global_mean_var over simulated data-parallel ranks ------------------------------


class _ThreadAllReduce:
    """An all-reduce sum among ``world`` threads: each deposits its tensor, all wait, each
    receives the sum. ``in_place`` mimics torch.distributed.all_reduce (returns None)."""

    def __init__(self, world, in_place):
        self.world = world
        self.in_place = in_place
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank):
        def all_reduce_sum(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # everyone has read the slots before the next call overwrites them
            if self.in_place:
                t.copy_(total)
                return None
            return total

        return all_reduce_sum


def _run_ranks(xs, masks, in_place, unbiased=True):
    reducer = _ThreadAllReduce(len(xs), in_place)
    results = [None] * len(xs)

    def work(rank):
        results[rank] = masked_global_mean_var(xs[rank], masks[rank], reducer.for_rank(rank), unbiased=unbiased)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("in_place", [True, False])
def test_global_mean_var_across_three_ranks(in_place):
    xs, masks = zip(*[_random(10 + r, shape=(2 + r, 5)) for r in range(3)])
    masks = list(masks)
    masks[1] = torch.zeros_like(masks[1])  # one rank with no response tokens at all
    all_selected = np.concatenate([x.numpy()[m.numpy() == 1] for x, m in zip(xs, masks)])

    results = _run_ranks(xs, masks, in_place)
    for mean, var in results:
        assert mean.item() == pytest.approx(all_selected.mean(), rel=1e-12)
        assert var.item() == pytest.approx(all_selected.var(ddof=1), rel=1e-12)

    biased = _run_ranks(xs, masks, in_place, unbiased=False)
    assert biased[0][1].item() == pytest.approx(all_selected.var(ddof=0), rel=1e-12)

    # Whitening each rank with the shared statistics gives global zero mean / unit variance.
    whitened = [whiten_with(x, m, mean, var, eps=0.0) for (x, m), (mean, var) in zip(zip(xs, masks), results)]
    pooled = np.concatenate([w.numpy()[m.numpy() == 1] for w, m in zip(whitened, masks)])
    assert abs(pooled.mean()) < 1e-12
    assert pooled.var(ddof=1) == pytest.approx(1.0, rel=1e-12)


def test_global_mean_var_single_rank_matches_local():
    x, mask = _random(20)
    mean, var = masked_global_mean_var(x, mask)
    torch.testing.assert_close(mean, masked_mean(x, mask))
    torch.testing.assert_close(var, masked_var(x, mask))


def test_global_mean_var_is_accurate_for_large_offset_in_float32():
    # Mean 1e4, spread 1: sum(x^2)/n - mean^2 would cancel to garbage in float32.
    gen = torch.Generator().manual_seed(21)
    x64 = 1e4 + torch.randn(64, 64, generator=gen, dtype=torch.float64)
    x = x64.float()
    mask = torch.ones(64, 64)
    _, var = masked_global_mean_var(x, mask)
    assert var.dtype == torch.float32
    assert var.item() == pytest.approx(np.var(x.double().numpy(), ddof=1), rel=1e-3)
