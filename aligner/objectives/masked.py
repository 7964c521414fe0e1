"""Reductions over the positions a mask selects.

Every loss in aligner averages over *some* tokens only (response tokens, not prompt or padding),
so the reductions live here once. They share three conventions:

* Accumulation happens in float32 (float64 if any input is float64), whatever the input dtype:
  a bf16 sum over thousands of tokens loses most of its digits. Results are returned in that
  accumulation dtype, not cast back, so a bf16 model still gets float32 losses and advantages.
* A mask is 1 (or True) where a position counts and 0 where it does not; any float mask is used
  as a weight. Values at masked-out positions never reach the result, even if they are inf or
  NaN (padding logits can be anything).
* An empty selection is not an error: means and variances of nothing are 0, so a micro-batch
  whose responses were all truncated gives a zero loss instead of NaN poisoning the step.

The global (data-parallel) statistics take an ``all_reduce_sum`` callable instead of importing
``torch.distributed``, which keeps this module free of process groups and testable on its own.
"""

from typing import Callable, Optional, Tuple

import torch

AllReduceSum = Callable[[torch.Tensor], Optional[torch.Tensor]]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype reductions run in: float64 if any input is float64, else float32."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x * mask`` and ``mask`` in the compute dtype, with masked-out entries exactly 0.

    ``torch.where`` rather than a plain product so that inf/NaN at ignored positions cannot turn
    into NaN through ``inf * 0``; its backward also sends exactly zero gradient there.
    """
    dtype = compute_dtype(x, mask) if mask.is_floating_point() else compute_dtype(x)
    mask = mask.to(dtype)
    x = x.to(dtype)
    selected = torch.where(mask != 0, x * mask, torch.zeros((), dtype=dtype, device=x.device))
    return selected, mask


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 wherever the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1), 0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is nonzero, weighted by ``mask``.

    Args:
        x: any shape, e.g. ``[batch, seq]``.
        mask: same shape as ``x`` (bool, int or float).
        dim: reduce only this dimension; ``None`` reduces everything to a scalar.
    Returns:
        scalar, or ``x`` with ``dim`` removed.
    """
    selected, _ = _masked_values(x, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over the positions ``mask`` selects; 0 (not NaN) where nothing is selected.

    Args:
        x: any shape, e.g. ``[batch, seq]``.
        mask: same shape as ``x``.
        dim: reduce only this dimension (e.g. ``-1`` for a per-sequence mean ``[batch]``);
            ``None`` averages over every selected position at once (token-weighted).
    """
    selected, mask = _masked_values(x, mask)
    if dim is None:
        return _safe_divide(selected.sum(), mask.sum())
    return _safe_divide(selected.sum(dim=dim), mask.sum(dim=dim))


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: Optional[int] = None
) -> torch.Tensor:
    """Variance of ``x`` over the selected positions (two-pass: mean first, then squares).

    ``unbiased`` divides by ``n - 1`` (Bessel). With fewer selected positions than that needs
    (n == 0, or n == 1 when unbiased) the variance is undefined; 0 is returned so that
    whitening such a batch leaves it centred rather than NaN.
    """
    mean = masked_mean(x, mask, dim=dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    selected, mask = _masked_values(x, mask)
    centred_sq = torch.where(mask != 0, (selected - mean) ** 2 * mask, 0)
    if dim is None:
        total, count = centred_sq.sum(), mask.sum()
    else:
        total, count = centred_sq.sum(dim=dim), mask.sum(dim=dim)
    if unbiased:
        count = torch.where(count > 1, count - 1, 0)
    return _safe_divide(total, count)


def whiten_with(
    x: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise ``x`` to unit variance with statistics computed elsewhere (e.g. over all ranks).

    ``shift_mean=False`` keeps the original mean (only rescales), which some PPO variants use for
    rewards so their sign is preserved. Masked-out positions are set to 0.

    Args:
        x, mask: ``[batch, seq]`` (or any matching shapes).
        mean, var: scalars (or tensors broadcastable to ``x``).
    """
    selected, mask = _masked_values(x, mask)
    mean = mean.to(selected.dtype)
    var = var.to(selected.dtype)
    whitened = (selected - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the (unbiased) mean and variance of its own selected positions.

    This is the local version of advantage normalisation; see ``masked_global_mean_var`` for
    statistics shared across data-parallel ranks. Masked-out positions are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    return whiten_with(x, mask, mean, var, shift_mean=shift_mean, eps=eps)


def _reduce(t: torch.Tensor, all_reduce_sum: Optional[AllReduceSum]) -> torch.Tensor:
    """Apply a user-supplied cross-rank sum that may work in place (returning None) or not."""
    if all_reduce_sum is None:
        return t
    result = all_reduce_sum(t)
    # torch.distributed.all_reduce returns None (or a Work handle) and sums in place.
    return result if isinstance(result, torch.Tensor) else t


def masked_global_mean_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    all_reduce_sum: Optional[AllReduceSum] = None,
    unbiased: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over the selected positions on *all* data-parallel ranks.

    Two passes (two small all-reduces) instead of one pass over ``sum(x)`` and ``sum(x**2)``:
    the one-pass formula cancels catastrophically in float32 when the mean is large compared
    with the spread, and two 1-element collectives cost nothing next to a PPO step.

    Args:
        x, mask: this rank's ``[batch, seq]`` values and mask.
        all_reduce_sum: sums a 1-D tensor over the data-parallel group, either in place
            (``lambda t: torch.distributed.all_reduce(t, group=dp_group)``) or by returning the
            summed tensor. ``None`` means a single rank.
        unbiased: divide the summed squares by ``N - 1`` (global N).
    Returns:
        ``(mean, var)`` scalars, identical on every rank; 0 where undefined (see ``masked_var``).
    """
    selected, mask = _masked_values(x, mask)
    sum_and_count = torch.stack([selected.sum(), mask.sum()])
    sum_and_count = _reduce(sum_and_count, all_reduce_sum)
    total, count = sum_and_count[0], sum_and_count[1]
    mean = _safe_divide(total, count)

    centred_sq = torch.where(mask != 0, (selected - mean) ** 2 * mask, 0)
    sq_sum = _reduce(centred_sq.sum().reshape(1), all_reduce_sum)[0]
    if unbiased:
        count = torch.where(count > 1, count - 1, 0)
    return mean, _safe_divide(sq_sum, count)
