"""The clipped policy-gradient loss shared by PPO and the critic-free algorithms, and the ways
of reducing a per-token loss to a scalar (``loss_agg_mode``).

Per token (Schulman et al., 2017, with DAPO's decoupled clip range, Yu et al., 2025, and the
optional dual clip of Ye et al., 2020)::

    ratio  = exp(logp - logp_old)
    l      = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
    l      = min(l, -A * clip_ratio_c)         where A < 0, if clip_ratio_c is set (dual clip)

Aggregation modes (verl's ``agg_loss`` names and semantics)::

    token-mean                 sum_{i,t} l_it / (number of tokens)
    seq-mean-token-mean        sum_i (mean_t l_it) / (number of sequences)
    seq-mean-token-sum         sum_i (sum_t l_it) / (number of sequences)
    seq-mean-token-sum-norm    sum_i (sum_t l_it / loss_scale_factor) / (number of sequences)
                               (Dr. GRPO: a constant per-token normaliser, e.g. the maximum
                               response length, instead of each response's own length)

"Number of sequences" counts rows with at least one token in the mask: an empty row (every
token masked out, e.g. a truncated response under ``mask_truncated_completions``) contributes
nothing to the numerator and is not counted either.

**Split invariance.** Each mode is ``numerator / denominator`` where both are sums over rows
(``loss_sum_and_count``). Passing ``global_count`` (the denominator summed over every
micro-batch and data-parallel rank of the optimizer step, via ``aggregation_count``) to
``aggregate_loss`` makes each micro-batch's loss its share of the global mean, so the gradients
*summed* over micro-batches and ranks equal the gradient of one pass over the whole batch, for
any split. (A data-parallel wrapper that *averages* gradients over ranks needs the loss scaled
by the data-parallel size; one that sums, like megatron with per-token loss, does not.)
Without ``global_count`` the local count is used: each micro-batch is normalised on its own,
which changes the update when micro-batches differ in size.
"""

from typing import Dict, Optional, Tuple

import torch

from aligner.objectives.kl import token_kl
from aligner.objectives.masked import _safe_divide, compute_dtype, masked_mean, masked_sum

LOSS_AGG_MODES: Tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_loss_agg_mode(mode: str, key: str = "algorithm.loss_agg_mode") -> str:
    """Return ``mode`` if it is one of ``LOSS_AGG_MODES``; else raise ValueError naming ``key``."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{key}={mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")
    return mode


def aggregation_count(mask: torch.Tensor, mode: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The local denominator of ``mode``: masked tokens (summed mask weights) for
    ``token-mean``, non-empty rows for the ``seq-mean-*`` modes. Sum it over micro-batches and
    ranks for ``global_count``.

    Args:
        mask: ``[batch, T]``.
        dtype: of the result; default float32 (float64 for a float64 mask).
    Returns:
        scalar.
    """
    check_loss_agg_mode(mode, "loss_agg_mode")
    if dtype is None:
        dtype = compute_dtype(mask) if mask.is_floating_point() else torch.float32
    if mode == "token-mean":
        return torch.where(mask != 0, mask.to(dtype), 0).sum()
    return ((mask != 0).sum(dim=-1) > 0).to(dtype).sum()


def loss_sum_and_count(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of ``mode`` over this batch, so that
    ``aggregate_loss == numerator / denominator``; both are sums over rows and add up across
    micro-batches and ranks (the form megatron's per-token-loss schedule consumes).

    Args:
        loss_mat: ``[batch, T]`` per-token losses.
        mask: ``[batch, T]``; a float mask weights tokens (token-mean, token sums).
        mode: one of ``LOSS_AGG_MODES``.
        loss_scale_factor: ``seq-mean-token-sum-norm``'s per-sequence divisor; default the padded
            width ``T`` (verl's default; pass the configured maximum response length to keep it
            constant across steps).
    Returns:
        two scalars (numerator with gradient, denominator without).
    """
    check_loss_agg_mode(mode, "loss_agg_mode")
    # the dtype masked_sum accumulates in, so that token-mean is bitwise masked_mean
    dtype = compute_dtype(loss_mat, mask) if mask.is_floating_point() else compute_dtype(loss_mat)
    count = aggregation_count(mask, mode, dtype)
    if mode == "token-mean":
        return masked_sum(loss_mat, mask), count
    seq_sums = masked_sum(loss_mat, mask, dim=-1)  # [batch]
    if mode == "seq-mean-token-sum":
        per_seq = seq_sums
    elif mode == "seq-mean-token-sum-norm":
        per_seq = seq_sums / float(loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
    else:  # seq-mean-token-mean; empty rows give 0 / 0 -> 0
        per_seq = masked_mean(loss_mat, mask, dim=-1)
    return per_seq.sum(), count


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_count: Optional[torch.Tensor | float] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar the way ``mode`` says (see the module docstring).

    Args:
        loss_mat: ``[batch, T]``.
        mask: ``[batch, T]``.
        mode: one of ``LOSS_AGG_MODES``.
        global_count: the denominator over the whole optimizer step (``aggregation_count``
            summed over all micro-batches and data-parallel ranks): tokens for ``token-mean``,
            non-empty sequences otherwise. None uses this batch's own count.
        loss_scale_factor: see ``loss_sum_and_count``.
    Returns:
        scalar; 0 (not NaN) when the denominator is 0.
    """
    numerator, count = loss_sum_and_count(loss_mat, mask, mode, loss_scale_factor)
    if global_count is not None:
        count = torch.as_tensor(global_count, dtype=numerator.dtype, device=numerator.device)
    return _safe_divide(numerator, count.to(numerator.dtype))


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    global_count: Optional[torch.Tensor | float] = None,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss (to minimise) with a decoupled clip range and an optional
    dual clip, aggregated by ``loss_agg_mode``.

    Args:
        logprobs: ``[batch, T]`` current policy, with gradient.
        old_logprobs: ``[batch, T]`` policy that generated the rollouts (no gradient).
        advantages: ``[batch, T]`` (e.g. ``advantages.broadcast_to_tokens`` of ``[batch]``).
        mask: ``[batch, T]``, 1 on the tokens that count.
        clip_ratio_low: ratios below ``1 - clip_ratio_low`` are clipped (PPO's epsilon).
        clip_ratio_high: ratios above ``1 + clip_ratio_high`` are clipped; None means
            ``clip_ratio_low`` (symmetric PPO). DAPO's clip-higher uses e.g. 0.2 / 0.28.
        clip_ratio_c: dual-clip constant (> 1, verl's default 3.0): for negative advantages
            the loss is capped at ``-A * clip_ratio_c``, so a token whose ratio has grown huge
            cannot dominate the update. None disables it.
        loss_agg_mode, global_count, loss_scale_factor: see ``aggregate_loss``.
    Returns:
        ``(loss, metrics)``; metrics are detached scalars, token means over ``mask`` of this
        batch (combine them across micro-batches with the local token count):
        ``clip_fraction``: tokens with the ratio outside ``[1 - low, 1 + high]``;
        ``dual_clip_fraction`` (only with ``clip_ratio_c``): tokens where the dual clip binds;
        ``approx_kl``: k3 estimate of KL(old || new) (the tokens were sampled from the old
        policy); ``ratio_mean``: mean ratio.
    """
    check_loss_agg_mode(loss_agg_mode, "loss_agg_mode")
    high = clip_ratio_low if clip_ratio_high is None else clip_ratio_high
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"the dual-clip constant clip_ratio_c must be > 1, got {clip_ratio_c}")
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    logprobs = logprobs.to(dtype)
    old_logprobs = old_logprobs.to(dtype)
    advantages = advantages.to(dtype)

    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:
        dual = -advantages * clip_ratio_c
        dual_binds = (advantages < 0) & (per_token > dual)
        per_token = torch.where(dual_binds, dual, per_token)
    loss = aggregate_loss(per_token, mask, loss_agg_mode, global_count, loss_scale_factor)

    with torch.no_grad():
        # written on ratio - 1 so that the symmetric case is exactly |ratio - 1| > eps
        outside = ((ratio - 1.0) < -clip_ratio_low) | ((ratio - 1.0) > high)
        metrics = {
            "clip_fraction": masked_mean(outside.to(dtype), mask),
            "approx_kl": masked_mean(token_kl(old_logprobs, logprobs, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if clip_ratio_c is not None:
            metrics["dual_clip_fraction"] = masked_mean(dual_binds.to(dtype), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
