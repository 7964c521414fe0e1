"""PPO maths: reward shaping with a KL penalty, GAE, and the clipped policy and value losses.

Conventions (NeMo-Aligner's). Every ``[batch, T]`` tensor is indexed by response position:
``logprobs[:, t]`` is the log-probability of the token the policy generated at ``t``,
``values[:, t]`` the critic's estimate of the return from ``t`` onwards. ``mask`` is 1 on
generated response tokens and 0 on prompt positions (which may come first in a row) and on
padding after the response. A response is expected to be one contiguous run of ones; a hole
in the mask behaves like the end of an episode.

Each implementation detail is a separate function with the paper's name, so that a trainer's
choice (absolute KL or not, value clipping or not, advantage whitening) is visible in the
trainer and each piece has its own hand-worked test. Everything is computed in float32
(float64 for float64 inputs); metrics are detached scalar tensors.
"""

from typing import Dict, Optional, Tuple

import torch

from aligner.objectives.kl import token_kl
from aligner.objectives.masked import compute_dtype, masked_mean
from aligner.objectives.policy_loss import clipped_policy_loss


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, use_absolute_kl: bool) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, ``logp - logp_ref``.

    Summed over a sampled response this is an unbiased estimate of KL(policy || ref) but each
    term can be negative; ``use_absolute_kl`` takes ``|logp - logp_ref|`` so the penalty can
    never turn into a bonus. (``kl.token_kl`` with ``"k1"`` / ``"abs"``.)

    Args:
        logprobs, ref_logprobs: ``[batch, T]``.
    Returns:
        ``[batch, T]``.
    """
    return token_kl(logprobs, ref_logprobs, "abs" if use_absolute_kl else "k1")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``mask`` is nonzero in each row, -1 for an empty row.

    Args:
        mask: ``[batch, T]``.
    Returns:
        ``[batch]`` long.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, -1).max(dim=-1).values


def shape_rewards(
    scalar_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    use_absolute_kl: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every response token, plus the reward model's score
    on the last one (the score is for the whole response, which is only complete there).

    Args:
        scalar_rewards: ``[batch]`` reward-model scores of each response.
        logprobs, ref_logprobs: ``[batch, T]`` log-probabilities of the generated tokens under
            the policy that generated them and under the frozen reference.
        mask: ``[batch, T]``, 1 on response tokens.
        kl_coef: weight of the KL penalty (``init_policy_kl_penalty`` in NeMo-Aligner).
        use_absolute_kl: see ``kl_penalty``.
    Returns:
        ``(token_rewards, kl)``, both ``[batch, T]`` and 0 outside the mask. A row with an
        empty mask receives no score.
    """
    dtype = compute_dtype(scalar_rewards, logprobs, ref_logprobs)
    mask_f = (mask != 0).to(dtype)
    kl = kl_penalty(logprobs, ref_logprobs, use_absolute_kl).to(dtype) * mask_f
    token_rewards = -kl_coef * kl

    last = last_token_index(mask)
    has_response = (last >= 0).to(dtype)
    score = (scalar_rewards.to(dtype) * has_response).unsqueeze(-1)
    token_rewards = token_rewards.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), score)
    return token_rewards, kl


def generalized_advantage_estimation(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), backwards over positions.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where ``V`` and ``A`` are 0 past the end of the row and at masked-out positions (the episode
    ends after the last response token; prompt positions before the response carry nothing).
    ``lam = 1`` gives Monte-Carlo returns minus the baseline, ``lam = 0`` one-step TD errors.

    Args:
        rewards: ``[batch, T]`` per-token rewards (see ``shape_rewards``).
        values: ``[batch, T]`` critic values at each position.
        mask: ``[batch, T]``, 1 on response tokens.
        gamma: discount factor.
        lam: GAE lambda.
    Returns:
        ``(advantages, returns)``, both ``[batch, T]`` and 0 outside the mask;
        ``returns = advantages + values`` is the critic's regression target.
    """
    dtype = compute_dtype(rewards, values)
    mask_f = (mask != 0).to(dtype)
    rewards = rewards.to(dtype) * mask_f
    values = values.to(dtype) * mask_f

    zero = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zero, zero
    advantages_reversed = []
    # A Python loop over T: the recursion is sequential, and T is at most a few thousand.
    for t in reversed(range(values.shape[-1])):
        td_error = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (td_error + gamma * lam * next_advantage) * mask_f[:, t]
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = (advantages + values) * mask_f
    return advantages, returns


def approx_kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's "k3" estimate of KL(p || q) from tokens sampled from p, averaged over the mask.

    With ``log_r = log q - log p`` per token, ``k3 = exp(log_r) - 1 - log_r``: unbiased like
    ``-log_r`` but never negative and with lower variance when p and q are close.

    Args:
        logprobs: ``[batch, T]`` log p of the sampled tokens (the sampling distribution).
        ref_logprobs: ``[batch, T]`` log q of the same tokens.
        mask: ``[batch, T]``.
    Returns:
        scalar.
    """
    return masked_mean(token_kl(logprobs, ref_logprobs, "k3"), mask)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ratio_eps: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate objective (Schulman et al., 2017), as a loss to minimise.

    ``ratio = exp(logp - logp_old)``; per token ``max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))``,
    averaged over the tokens of ``mask`` (token-weighted across the whole micro-batch).
    This is ``policy_loss.clipped_policy_loss`` with a symmetric clip range and ``token-mean``
    over the micro-batch's own tokens.

    Args:
        logprobs: ``[batch, T]`` current policy, with gradient.
        old_logprobs: ``[batch, T]`` policy that generated the rollouts (no gradient).
        advantages: ``[batch, T]`` (already whitened if the trainer wants that).
        mask: ``[batch, T]``; the caller folds in any row selection (e.g. ``mask * is_end``).
        ratio_eps: clip range epsilon.
    Returns:
        ``(loss, metrics)``; metrics (detached):
        ``clip_fraction``: fraction of tokens with ``|ratio - 1| > eps``;
        ``approx_kl``: ``approx_kl_k3(old_logprobs, logprobs)``, k3 estimate of KL(old || new)
        (the tokens were sampled from the old policy);
        ``ratio_mean``: mean ratio over the tokens.
    """
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio_low=ratio_eps,
                               clip_ratio_high=ratio_eps, loss_agg_mode="token-mean")


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_val: Optional[float],
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Critic loss with PPO-style value clipping.

    ``0.5 * mean(max((V - R)^2, (V_clipped - R)^2))`` where ``V_clipped`` is ``V`` kept within
    ``clip_val`` of the value predicted at rollout time, so the critic cannot jump far in one
    update. ``clip_val=None`` disables clipping (plain ``0.5 * mean((V - R)^2)``).

    Args:
        values: ``[batch, T]`` current critic output, with gradient.
        old_values: ``[batch, T]`` critic output at rollout time.
        returns: ``[batch, T]`` targets from ``generalized_advantage_estimation``.
        mask: ``[batch, T]``.
        clip_val: clip range, or ``None``.
    Returns:
        ``(loss, metrics)``; ``value_clip_fraction`` is the fraction of tokens with
        ``|V - V_old| > clip_val`` (0 when clipping is off).
    """
    dtype = compute_dtype(values, old_values, returns)
    values = values.to(dtype)
    old_values = old_values.to(dtype)
    returns = returns.to(dtype)

    unclipped_sq = (values - returns) ** 2
    if clip_val is None:
        loss = 0.5 * masked_mean(unclipped_sq, mask)
        clip_fraction = torch.zeros((), dtype=dtype, device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_val, clip_val)
        clipped_sq = (clipped_values - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
        with torch.no_grad():
            clip_fraction = masked_mean(((values - old_values).abs() > clip_val).to(dtype), mask)
    return loss, {"value_clip_fraction": clip_fraction.detach()}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy over the tokens of ``mask`` (the trainer subtracts ``coef *`` this).

    Args:
        entropy: ``[batch, T]`` from ``logprobs.entropy_from_logits``.
        mask: ``[batch, T]``.
    Returns:
        scalar.
    """
    return masked_mean(entropy, mask)
