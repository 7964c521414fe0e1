"""KL divergence between the policy and a reference (or an older policy), per token.

Two kinds:

* **Sample estimators** from the log-probabilities of the sampled tokens only (what RL on LLMs
  can afford): Schulman's k1, k2, k3 (http://joschu.net/blog/kl-approx.html) and ``abs``.
  Tokens are assumed sampled from the policy ``p``; with ``log_r = log q - log p`` per token:

  ==========  ==========================  =============================================
  estimator   per token                   properties
  ==========  ==========================  =============================================
  ``k1``      ``-log_r = log p - log q``  unbiased for KL(p || q); can be negative
  ``abs``     ``|log p - log q|``         biased upwards; never negative (NeMo-Aligner's
                                          ``use_absolute_kl``)
  ``k2``      ``0.5 * log_r ** 2``        biased; low variance; gradient is that of a
                                          forward-KL-like penalty
  ``k3``      ``exp(log_r) - 1 - log_r``  unbiased and never negative (verl's
                                          ``low_var_kl``, GRPO's KL loss term)
  ==========  ==========================  =============================================

* **Exact** KL between two full next-token distributions (``[.., vocab]`` log-probs), used
  where the reference's whole distribution is at hand (DPO validation).

All functions are differentiable in both arguments, compute in float32 (float64 for float64
inputs) and never reduce: the caller aggregates with a mask (``masked_mean``,
``policy_loss.aggregate_loss``).
"""

from typing import Tuple

import torch

from aligner.objectives.masked import compute_dtype

KL_ESTIMATORS: Tuple[str, ...] = ("k1", "abs", "k2", "k3")


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token sample estimate of KL(p || q) for tokens sampled from ``p``.

    Args:
        logprobs: ``[batch, T]`` log p of the sampled tokens (the sampling policy).
        ref_logprobs: ``[batch, T]`` log q of the same tokens (the reference).
        estimator: one of ``KL_ESTIMATORS`` (see the module docstring).
    Returns:
        ``[batch, T]``, unmasked (positions outside the response hold whatever the inputs give;
        mask them when reducing).
    """
    dtype = compute_dtype(logprobs, ref_logprobs)
    diff = logprobs.to(dtype) - ref_logprobs.to(dtype)  # log p - log q = -log_r
    if estimator == "k1":
        return diff
    if estimator == "abs":
        return diff.abs()
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        # exp(log_r) - 1 - log_r with log_r = -diff; expm1 keeps digits when p and q are close.
        return torch.expm1(-diff) + diff
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def exact_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) = sum_v p(v) (log p(v) - log q(v)) between two categorical distributions.

    Args:
        log_probs: ``[..., vocab]`` log p (normalised, e.g. ``log_softmax`` of the policy logits).
        ref_log_probs: ``[..., vocab]`` log q.
    Returns:
        ``[...]`` (the vocabulary dimension summed out); 0 where p == q.
    """
    dtype = compute_dtype(log_probs, ref_log_probs)
    log_p = log_probs.to(dtype)
    log_q = ref_log_probs.to(dtype)
    # p * (log p - log q) with 0 * (anything) = 0 where p underflows to 0, even if q is 0 there
    # too (log q = -inf would otherwise give 0 * inf = NaN).
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device))
    return terms.sum(dim=-1)
