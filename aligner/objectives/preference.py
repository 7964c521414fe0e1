"""Losses on pairs of responses: reward-model training and DPO-style policy training.

Both learn from a chosen and a rejected response to the same prompt.

* ``bradley_terry_loss`` trains a reward model: P(chosen beats rejected) = sigmoid(r_c - r_r).
* ``preference_loss`` trains a policy directly (DPO and relatives). Following DPO, the policy's
  *implicit reward* of a response is its log-probability ratio to a frozen reference,
  ``r = logp_policy - logp_ref``; ``delta = r_chosen - r_rejected``. The loss types follow the
  NeMo-Aligner names and definitions (``model.dpo.preference_loss``):

  ==============  ==========================================================================
  ``dpo``         ``-log sigmoid(beta * delta)``  (Rafailov et al., 2023)
  ``ipo``         ``(delta - 1 / (2 beta))**2``  (Azar et al., 2023)
  ``rpo_sq``      ``(beta * delta - gt_delta)**2``
  ``rpo_fwd_kl``  ``KL(Bern(sigmoid(beta delta)) || Bern(sigmoid(gt_delta)))``
  ``rpo_bwd_kl``  ``KL(Bern(sigmoid(gt_delta)) || Bern(sigmoid(beta delta)))``
  ==============  ==========================================================================

  The ``rpo_*`` ("reward-aware preference optimisation") losses regress the implicit reward gap
  onto a ground-truth one, ``gt_delta = gt_reward_scale * (gt_chosen - gt_rejected)``, taken from
  the dataset. The two KL forms are written with ``logsigmoid`` throughout so they stay finite,
  with finite gradients, for margins of any size.

All maths runs in float32 (float64 for float64 inputs). Metrics are detached scalar tensors
(no host sync here; the trainer decides when to reduce and log them).
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from aligner.objectives.masked import compute_dtype

PREFERENCE_LOSS_TYPES = ("dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl")
_NEEDS_GT_REWARDS = ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Reward-model loss ``-mean(log sigmoid(r_chosen - r_rejected))``.

    Args:
        chosen_rewards, rejected_rewards: ``[batch]`` scalar rewards of each pair.
    Returns:
        ``(loss, metrics)``; metrics:

        * ``accuracy``: fraction of pairs ranked correctly, where a tie counts 0.5. A model that
          cannot tell the two apart (e.g. a constant reward at initialisation) then scores the
          chance level 0.5 rather than 0, which is what a tie is worth under random tie-breaking.
        * ``reward_margin``: mean ``r_chosen - r_rejected``.
        * ``chosen_reward_mean``, ``rejected_reward_mean``.
        * ``reward_mean``, ``reward_std``: over all ``2 * batch`` rewards (unbiased std, 0 for a
          single reward), to watch the reward scale drift.
    """
    dtype = compute_dtype(chosen_rewards, rejected_rewards)
    chosen = chosen_rewards.to(dtype)
    rejected = rejected_rewards.to(dtype)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()

    with torch.no_grad():
        wins = (margin > 0).to(dtype) + 0.5 * (margin == 0).to(dtype)
        all_rewards = torch.cat([chosen, rejected])
        std = all_rewards.std() if all_rewards.numel() > 1 else torch.zeros((), dtype=dtype)
        metrics = {
            "accuracy": wins.mean(),
            "reward_margin": margin.mean(),
            "chosen_reward_mean": chosen.mean(),
            "rejected_reward_mean": rejected.mean(),
            "reward_mean": all_rewards.mean(),
            "reward_std": std,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def preference_loss_per_pair(
    delta: torch.Tensor,
    beta: float,
    loss_type: str,
    gt_delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The loss of each pair, from its implicit-reward gap ``delta`` (see module docstring).

    Args:
        delta: ``[batch]``, ``(logp_c - ref_c) - (logp_r - ref_r)``.
        beta: the KL-penalty strength (inverse temperature) of the implicit reward.
        loss_type: one of ``PREFERENCE_LOSS_TYPES``.
        gt_delta: ``[batch]`` scaled ground-truth reward gap; required by the ``rpo_*`` types.
    Returns:
        ``[batch]`` losses, in ``delta``'s dtype.
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(
            f"unknown preference loss {loss_type!r} (config key model.dpo.preference_loss); "
            f"valid values: {', '.join(PREFERENCE_LOSS_TYPES)}"
        )
    if loss_type in _NEEDS_GT_REWARDS and gt_delta is None:
        raise ValueError(
            f"preference loss {loss_type!r} (model.dpo.preference_loss) regresses onto ground-truth "
            "rewards, but none were given: the dataset must provide a reward for both the chosen "
            "and the rejected response (passed as chosen_gt_rewards / rejected_gt_rewards), or "
            "use preference_loss 'dpo' or 'ipo'"
        )
    if loss_type == "dpo":
        return -F.logsigmoid(beta * delta)
    if loss_type == "ipo":
        if beta <= 0:
            raise ValueError(f"ipo needs beta > 0 (its target margin is 1 / (2 beta)), got {beta}")
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "rpo_sq":
        return (beta * delta - gt_delta) ** 2

    # The KL between two Bernoulli distributions, each given by log-probabilities of its two
    # outcomes. log sigmoid(x) and log sigmoid(-x) are both exact for any x, and exp() of a very
    # negative log-probability underflows to 0 times a finite number: no inf, no NaN.
    log_model_chosen = F.logsigmoid(beta * delta)
    log_model_rejected = F.logsigmoid(-beta * delta)
    log_gt_chosen = F.logsigmoid(gt_delta)
    log_gt_rejected = F.logsigmoid(-gt_delta)
    if loss_type == "rpo_fwd_kl":  # KL(model || ground truth)
        return torch.exp(log_model_chosen) * (log_model_chosen - log_gt_chosen) + torch.exp(
            log_model_rejected
        ) * (log_model_rejected - log_gt_rejected)
    # rpo_bwd_kl: KL(ground truth || model)
    return torch.exp(log_gt_chosen) * (log_gt_chosen - log_model_chosen) + torch.exp(
        log_gt_rejected
    ) * (log_gt_rejected - log_model_rejected)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str,
    chosen_gt_rewards: Optional[torch.Tensor] = None,
    rejected_gt_rewards: Optional[torch.Tensor] = None,
    gt_reward_scale: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DPO-family loss, averaged over the batch of pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[batch]`` sequence log-probabilities under
            the policy being trained (see ``logprobs.sequence_logprobs``).
        ref_chosen_logps, ref_rejected_logps: ``[batch]`` the same under the frozen reference.
        beta: implicit-reward scale (``model.dpo.ref_policy_kl_penalty`` in NeMo-Aligner terms).
        loss_type: one of ``PREFERENCE_LOSS_TYPES`` (``model.dpo.preference_loss``).
        chosen_gt_rewards, rejected_gt_rewards: ``[batch]`` ground-truth rewards, needed by the
            ``rpo_*`` losses and ignored by the others.
        gt_reward_scale: multiplies the ground-truth reward gap.
    Returns:
        ``(loss, metrics)``; metrics (detached scalars):
        ``preference_accuracy`` (fraction with ``delta > 0``; exact ties, e.g. at step 0 where
        policy == reference, count as wrong), ``implicit_reward_margin`` (mean ``beta*delta``),
        ``chosen_implicit_reward`` / ``rejected_implicit_reward`` (means of ``beta*r``),
        ``chosen_logps`` / ``rejected_logps`` (means of the policy log-probabilities).
    """
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_reward = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_reward = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    delta = chosen_reward - rejected_reward

    gt_delta = None
    if loss_type in _NEEDS_GT_REWARDS and (chosen_gt_rewards is not None or rejected_gt_rewards is not None):
        if chosen_gt_rewards is None or rejected_gt_rewards is None:
            missing = "chosen_gt_rewards" if chosen_gt_rewards is None else "rejected_gt_rewards"
            raise ValueError(
                f"preference loss {loss_type!r} (model.dpo.preference_loss) needs ground-truth rewards "
                f"for both responses of each pair, but {missing} is missing"
            )
        gt_delta = gt_reward_scale * (chosen_gt_rewards.to(dtype) - rejected_gt_rewards.to(dtype))

    loss = preference_loss_per_pair(delta, beta, loss_type, gt_delta).mean()

    with torch.no_grad():
        metrics = {
            "preference_accuracy": (delta > 0).to(dtype).mean(),
            "implicit_reward_margin": (beta * delta).mean(),
            "chosen_implicit_reward": (beta * chosen_reward).mean(),
            "rejected_implicit_reward": (beta * rejected_reward).mean(),
            "chosen_logps": policy_chosen_logps.to(dtype).mean(),
            "rejected_logps": policy_rejected_logps.to(dtype).mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
