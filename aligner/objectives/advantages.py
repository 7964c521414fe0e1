"""Critic-free advantage estimators: GRPO (and Dr. GRPO), RLOO, REINFORCE++, REINFORCE++ with a
group baseline, and ReMax. PPO's GAE lives in ``ppo.py``.

Conventions:

* Samples come in **groups**: a batch of ``N = G * n`` responses holds ``n = num_generations``
  consecutive samples per prompt (``[p0, p0, p0, p1, p1, p1, ...]``), which is how the rollout
  engine lays them out. Grouped estimators view ``[N]`` as ``[G, n]``.
* ``valid`` (optional, ``[N]`` bool) marks samples that have a reward. An invalid sample (a
  reward function returned ``None``) takes no part in its group's statistics and gets exactly
  zero advantage.
* A group whose valid rewards are all equal (including a group with fewer than two valid
  samples) carries no learning signal: GRPO and RLOO give it exactly 0, never ``0 / 0`` or a
  rounding residue such as ``1e-8`` (which std-normalisation would blow up).
* Sequence-level estimators return ``[N]``; ``broadcast_to_tokens`` spreads them over the
  response tokens. REINFORCE++ variants whiten over tokens and return ``[N, T]``.
* Everything is computed in float32 (float64 for float64 inputs), like the rest of the package.

Names and semantics follow verl's ``core_algos`` (``compute_grpo_outcome_advantage``,
``compute_rloo_outcome_advantage``, ``compute_reinforce_plus_plus_outcome_advantage``,
``compute_reinforce_plus_plus_baseline_outcome_advantage``, ``compute_remax_outcome_advantage``)
where NeMo-Aligner has none.
"""

from typing import Optional, Tuple

import torch

from aligner.objectives.masked import AllReduceSum, compute_dtype, masked_global_mean_var, whiten_with

ADV_ESTIMATORS: Tuple[str, ...] = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")
# Estimators whose baseline comes from the other samples of the same prompt: with one sample per
# prompt every advantage would be identically zero (GRPO, REINFORCE++-baseline) or undefined (RLOO).
GROUP_ESTIMATORS: Tuple[str, ...] = ("grpo", "rloo", "reinforce_plus_plus_baseline")


def check_num_generations(
    adv_estimator: str,
    num_generations: int,
    estimator_key: str = "algorithm.adv_estimator",
    num_generations_key: str = "model.grpo.num_generations",
) -> None:
    """Refuse, at start-up, an estimator that cannot learn with this many samples per prompt.

    Raises:
        ValueError: naming ``estimator_key`` for an unknown estimator, or
            ``num_generations_key`` when it is < 1, or < 2 for a group estimator.
    """
    if adv_estimator not in ADV_ESTIMATORS:
        raise ValueError(f"{estimator_key}={adv_estimator!r} is not one of {', '.join(ADV_ESTIMATORS)}")
    if num_generations < 1:
        raise ValueError(f"{num_generations_key}={num_generations}: need at least 1 sample per prompt")
    if adv_estimator in GROUP_ESTIMATORS and num_generations < 2:
        raise ValueError(
            f"{num_generations_key}={num_generations} with {estimator_key}={adv_estimator}: {adv_estimator} "
            f"compares the samples of one prompt with each other, so every advantage would be zero; set "
            f"{num_generations_key} >= 2 (or choose reinforce_plus_plus or remax)"
        )


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def _as_groups(
    rewards: torch.Tensor, num_generations: int, valid: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` and ``valid`` as ``[G, n]`` (rewards in the compute dtype, valid as bool)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.shape[0] % num_generations != 0:
        raise ValueError(
            f"{rewards.shape[0]} rewards do not form groups of num_generations={num_generations} consecutive samples"
        )
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    elif valid.shape != rewards.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the shape of rewards {tuple(rewards.shape)}")
    dtype = compute_dtype(rewards)
    return rewards.to(dtype).view(-1, num_generations), valid.to(torch.bool).view(-1, num_generations)


def _group_sum_count_spread(
    grouped: torch.Tensor, valid: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group ``[G, 1]``: sum and count of the valid rewards, and whether they differ.

    ``torch.where`` keeps invalid entries (which may be NaN placeholders) out of every result.
    """
    zero = torch.zeros((), dtype=grouped.dtype, device=grouped.device)
    total = torch.where(valid, grouped, zero).sum(dim=1, keepdim=True)
    count = valid.sum(dim=1, keepdim=True).to(grouped.dtype)
    hi = torch.where(valid, grouped, float("-inf")).amax(dim=1, keepdim=True)
    lo = torch.where(valid, grouped, float("inf")).amin(dim=1, keepdim=True)
    spread = (count >= 2) & (hi > lo)
    return total, count, spread


def groups_with_distinct_rewards(
    rewards: torch.Tensor, num_generations: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Which groups have at least two valid samples with different rewards (DAPO's dynamic
    sampling keeps only these: the others give zero GRPO/RLOO advantage).

    Args:
        rewards: ``[N]``, ``N = G * num_generations``.
        valid: optional ``[N]`` bool.
    Returns:
        ``[G]`` bool.
    """
    grouped, valid = _as_groups(rewards, num_generations, valid)
    return _group_sum_count_spread(grouped, valid)[2].squeeze(1)


def _group_mean_centred(grouped: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``(r - group mean, count, spread)``, the first exactly 0 where invalid or where the group
    has no spread."""
    total, count, spread = _group_sum_count_spread(grouped, valid)
    mean = total / count.clamp(min=1)
    keep = valid & spread
    return torch.where(keep, grouped - mean, 0), count, keep


def grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    norm_adv_by_std: bool = True,
    valid: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO's group-normalised advantage (Shao et al., 2024): ``(r - mean_g) / (std_g + eps)``.

    ``mean_g`` and ``std_g`` (unbiased, ``n - 1``) are taken over the valid samples of the
    sample's group. ``norm_adv_by_std=False`` gives Dr. GRPO (Liu et al., 2025): ``r - mean_g``,
    which does not up-weight prompts whose rewards barely differ (verl's
    ``algorithm.norm_adv_by_std_in_grpo``).

    Args:
        rewards: ``[N]`` sequence rewards, ``num_generations`` consecutive samples per prompt.
        num_generations: ``n``, samples per prompt.
        norm_adv_by_std: divide by the group's std.
        valid: optional ``[N]`` bool; invalid samples are ignored and get 0.
        eps: added to the std (a group with a tiny spread gets large but finite advantages).
    Returns:
        ``[N]``; exactly 0 for invalid samples and for groups whose valid rewards are all equal.
    """
    grouped, valid = _as_groups(rewards, num_generations, valid)
    centred, count, keep = _group_mean_centred(grouped, valid)
    if norm_adv_by_std:
        var = centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        centred = torch.where(keep, centred / (var.sqrt() + eps), 0)
    return centred.reshape(-1)


def rloo_advantages(
    rewards: torch.Tensor, num_generations: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024).

    Each sample's baseline is the mean reward of the *other* valid samples of its prompt:
    ``A_i = r_i - (sum_g - r_i) / (k - 1)`` with ``k`` valid samples in the group, which equals
    ``k / (k - 1) * (r_i - mean_g)``.

    Args:
        rewards: ``[N]``, ``num_generations`` consecutive samples per prompt.
        num_generations: ``n``.
        valid: optional ``[N]`` bool; invalid samples are ignored and get 0.
    Returns:
        ``[N]``; exactly 0 for invalid samples, for groups with fewer than 2 valid samples (no
        baseline exists) and for groups whose valid rewards are all equal.
    """
    grouped, valid = _as_groups(rewards, num_generations, valid)
    total, count, spread = _group_sum_count_spread(grouped, valid)
    keep = valid & spread
    baseline = (total - grouped) / (count - 1).clamp(min=1)
    return torch.where(keep, grouped - baseline, 0).reshape(-1)


def remax_advantages(
    rewards: torch.Tensor,
    baseline_rewards: torch.Tensor,
    num_generations: int = 1,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ReMax (Li et al., 2023): the baseline is the reward of the greedy response to the same
    prompt, ``A_i = r_i - r(greedy response of prompt(i))``.

    Args:
        rewards: ``[N]`` rewards of the sampled responses, ``num_generations`` per prompt.
        baseline_rewards: ``[N]`` (one baseline per sample) or ``[G]`` (one per prompt, repeated
            for its ``num_generations`` samples).
        num_generations: ``n``; needed to expand a ``[G]`` baseline.
        valid: optional ``[N]`` bool (invalid: the sample's or its greedy response's reward is
            missing); invalid samples get 0.
    Returns:
        ``[N]``. Not whitened; verl's ReMax isn't either.
    """
    grouped, valid = _as_groups(rewards, num_generations, valid)
    n = rewards.shape[0]
    if baseline_rewards.dim() != 1 or baseline_rewards.shape[0] not in (n, grouped.shape[0]):
        raise ValueError(
            f"baseline_rewards must be [N]={n} or [G]={grouped.shape[0]} (one greedy reward per prompt), "
            f"got shape {tuple(baseline_rewards.shape)}"
        )
    baseline = baseline_rewards.to(grouped.dtype)
    if baseline.shape[0] != n:
        baseline = baseline.repeat_interleave(num_generations)
    flat_valid = valid.reshape(-1)
    return torch.where(flat_valid, grouped.reshape(-1) - baseline, 0)


# --------------------------------------------------------------------------------------------
# Token level
# --------------------------------------------------------------------------------------------


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage.

    Args:
        advantages: ``[N]``.
        mask: ``[N, T]``, nonzero on response tokens (rows may be empty).
    Returns:
        ``[N, T]`` in the compute dtype; ``advantages[i]`` where ``mask[i, t] != 0``, else 0.
    """
    dtype = compute_dtype(advantages)
    return torch.where(mask != 0, advantages.to(dtype).unsqueeze(-1), torch.zeros((), dtype=dtype, device=mask.device))


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` along each response.

    ``G`` is 0 past the end of the row and at masked-out positions, so a row is one episode
    (as in ``ppo.generalized_advantage_estimation``; a hole in the mask ends the episode).

    Args:
        token_rewards: ``[N, T]`` per-token rewards, e.g. ``ppo.shape_rewards`` output (KL
            penalty on every token plus the score on the last one).
        mask: ``[N, T]``, nonzero on response tokens.
        gamma: discount factor (1.0 for undiscounted returns).
    Returns:
        ``[N, T]``, 0 outside the mask.
    """
    dtype = compute_dtype(token_rewards)
    keep = (mask != 0).to(dtype)
    rewards = torch.where(mask != 0, token_rewards.to(dtype), 0)
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    # A Python loop over T: the recursion is sequential, and T is at most a few thousand.
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * keep[:, t]
        reversed_returns.append(running)
    return torch.stack(reversed_returns[::-1], dim=-1)


def reinforce_plus_plus_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    all_reduce_sum: Optional[AllReduceSum] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): discounted returns of the KL-shaped token rewards, whitened over
    all response tokens of the global batch.

    Args:
        token_rewards: ``[N, T]``, e.g. from ``ppo.shape_rewards`` (the KL penalty is inside the
            reward; there is no critic and no group baseline).
        mask: ``[N, T]``, 1 on response tokens.
        gamma: discount factor.
        all_reduce_sum: sums a 1-D tensor over the data-parallel group so the whitening uses
            global statistics (see ``masked.masked_global_mean_var``); None on one rank.
        eps: added to the variance before the square root.
    Returns:
        ``[N, T]`` advantages, 0 outside the mask.
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    mean, var = masked_global_mean_var(returns, mask, all_reduce_sum=all_reduce_sum)
    return whiten_with(returns, mask, mean, var, eps=eps)


def reinforce_plus_plus_baseline_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    num_generations: int,
    valid: Optional[torch.Tensor] = None,
    all_reduce_sum: Optional[AllReduceSum] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean reward, spread the result over the response
    tokens, then whiten over all valid response tokens of the global batch (verl's
    ``reinforce_plus_plus_baseline``).

    The whitening shifts by the token-weighted global mean, so unlike GRPO an all-equal group
    ends up with a (small, equal) nonzero advantage on every token, as in verl.

    Args:
        rewards: ``[N]`` sequence rewards, ``num_generations`` consecutive samples per prompt.
            With a KL penalty in the reward, pass the row sums of the shaped token rewards.
        mask: ``[N, T]``, 1 on response tokens.
        num_generations: ``n``.
        valid: optional ``[N]`` bool; invalid samples are left out of the group means and of
            the whitening statistics, and get 0 on every token.
        all_reduce_sum: data-parallel sum for the whitening statistics (None on one rank).
        eps: added to the variance before the square root.
    Returns:
        ``[N, T]``, 0 outside the (valid rows of the) mask.
    """
    grouped, valid_g = _as_groups(rewards, num_generations, valid)
    centred, _, _ = _group_mean_centred(grouped, valid_g)
    token_mask = torch.where(valid_g.reshape(-1, 1), mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    scores = broadcast_to_tokens(centred.reshape(-1), token_mask)
    mean, var = masked_global_mean_var(scores, token_mask, all_reduce_sum=all_reduce_sum)
    return whiten_with(scores, token_mask, mean, var, eps=eps)
