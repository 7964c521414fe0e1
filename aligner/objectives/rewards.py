"""Sequence-level reward transforms applied before any advantage estimator.

Each function maps ``[batch]`` rewards (or response lengths) to ``[batch]`` rewards; none of
them looks at tokens or groups.
"""

from typing import Optional, Tuple

import torch

from aligner.objectives.masked import compute_dtype
from aligner.objectives.ppo import last_token_index


def standardize_rewards(rewards: torch.Tensor, stats: Optional[Tuple[float, float]]) -> torch.Tensor:
    """``(r - mean) / std`` with fixed statistics (e.g. the reward model's, measured on its
    training data), or ``rewards`` unchanged when ``stats`` is None.

    Args:
        rewards: ``[batch]``.
        stats: ``(mean, std)`` with ``std > 0``, or None.
    Returns:
        ``[batch]``, same dtype as ``rewards``.
    """
    if stats is None:
        return rewards
    mean, std = stats
    return (rewards - mean) / std


def overlong_reward_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float,
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), to be added to the reward.

    With ``L_max = max_response_length`` and ``L_buf = buffer_length``: 0 for responses up to
    ``L_max - L_buf`` tokens, then falling linearly to ``-penalty_factor`` at ``L_max``, and
    ``-penalty_factor`` beyond. (verl's ``overlong_buffer.len`` / ``penalty_factor``.)

    Args:
        response_lengths: ``[batch]`` generated tokens per response.
        max_response_length: ``L_max``.
        buffer_length: ``L_buf``, ``0 < L_buf <= L_max``.
        penalty_factor: the penalty at ``L_max`` (positive; the result is <= 0).
    Returns:
        ``[batch]`` float32 penalties (<= 0).
    """
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(
            f"overlong buffer length {buffer_length} must be in 1..{max_response_length} (the max response length)"
        )
    dtype = compute_dtype(response_lengths) if response_lengths.is_floating_point() else torch.float32
    excess = response_lengths.to(dtype) - (max_response_length - buffer_length)
    return -penalty_factor * (excess / buffer_length).clamp(0.0, 1.0)


def kl_shaped_token_rewards(
    scalar_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards ``-kl_coef * kl`` on the response tokens, plus each sequence's reward on
    its last response token (verl's ``use_kl_in_reward``; ``ppo.shape_rewards`` with any KL
    estimator from ``kl.token_kl``).

    Args:
        scalar_rewards: ``[batch]``.
        kl: ``[batch, T]`` per-token KL estimates (``kl.token_kl``).
        mask: ``[batch, T]``, 1 on response tokens.
        kl_coef: the penalty's weight (0 gives the plain outcome reward).
    Returns:
        ``[batch, T]``, 0 outside the mask; a row with an empty mask gets nothing.
    """
    dtype = compute_dtype(scalar_rewards, kl)
    mask_f = (mask != 0).to(dtype)
    token_rewards = -kl_coef * kl.to(dtype) * mask_f
    last = last_token_index(mask)
    score = (scalar_rewards.to(dtype) * (last >= 0).to(dtype)).unsqueeze(-1)
    return token_rewards.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), score)
