"""Pure tensor-in/tensor-out maths of alignment: log-probabilities, masks and masked reductions,
KL estimators, reward transforms, advantage estimators (GAE, GRPO, RLOO, REINFORCE++, ReMax),
and the SFT, preference (reward model, DPO family) and policy-gradient objectives. Imports only
torch."""

from aligner.objectives.advantages import (
    ADV_ESTIMATORS,
    GROUP_ESTIMATORS,
    broadcast_to_tokens,
    check_num_generations,
    discounted_returns,
    groups_with_distinct_rewards,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from aligner.objectives.kl import KL_ESTIMATORS, exact_kl, token_kl
from aligner.objectives.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs_from_logits
from aligner.objectives.masked import (
    masked_global_mean_var,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten_with,
)
from aligner.objectives.masks import length_mask, response_mask
from aligner.objectives.policy_loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    aggregation_count,
    check_loss_agg_mode,
    clipped_policy_loss,
    loss_sum_and_count,
)
from aligner.objectives.ppo import (
    approx_kl_k3,
    clipped_value_loss,
    entropy_bonus,
    generalized_advantage_estimation,
    kl_penalty,
    ppo_policy_loss,
    shape_rewards,
)
from aligner.objectives.preference import (
    PREFERENCE_LOSS_TYPES,
    bradley_terry_loss,
    preference_loss,
    preference_loss_per_pair,
)
from aligner.objectives.rewards import overlong_reward_penalty, standardize_rewards
from aligner.objectives.sft import language_model_loss_sum_and_count, masked_language_model_loss

__all__ = [
    "ADV_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "PREFERENCE_LOSS_TYPES",
    "aggregate_loss",
    "aggregation_count",
    "approx_kl_k3",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "check_loss_agg_mode",
    "check_num_generations",
    "clipped_policy_loss",
    "clipped_value_loss",
    "discounted_returns",
    "entropy_bonus",
    "entropy_from_logits",
    "exact_kl",
    "generalized_advantage_estimation",
    "groups_with_distinct_rewards",
    "grpo_advantages",
    "kl_penalty",
    "language_model_loss_sum_and_count",
    "length_mask",
    "loss_sum_and_count",
    "masked_global_mean_var",
    "masked_language_model_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_reward_penalty",
    "ppo_policy_loss",
    "preference_loss",
    "preference_loss_per_pair",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "remax_advantages",
    "response_mask",
    "rloo_advantages",
    "sequence_logprobs",
    "shape_rewards",
    "standardize_rewards",
    "token_kl",
    "token_logprobs_from_logits",
    "whiten_with",
]
