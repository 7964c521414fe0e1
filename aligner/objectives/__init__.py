"""Pure tensor-in/tensor-out maths of alignment: log-probabilities, masked reductions, and the
SFT, preference (reward model, DPO family) and PPO objectives. Imports only torch."""

from aligner.objectives.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs_from_logits
from aligner.objectives.masked import (
    masked_global_mean_var,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten_with,
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
from aligner.objectives.sft import language_model_loss_sum_and_count, masked_language_model_loss

__all__ = [
    "PREFERENCE_LOSS_TYPES",
    "approx_kl_k3",
    "bradley_terry_loss",
    "clipped_value_loss",
    "entropy_bonus",
    "entropy_from_logits",
    "generalized_advantage_estimation",
    "kl_penalty",
    "language_model_loss_sum_and_count",
    "masked_global_mean_var",
    "masked_language_model_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "preference_loss",
    "preference_loss_per_pair",
    "sequence_logprobs",
    "shape_rewards",
    "token_logprobs_from_logits",
    "whiten_with",
]
