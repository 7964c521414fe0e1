"""Supervised fine-tuning loss: negative log-likelihood of the target tokens.

Two forms. ``masked_language_model_loss`` is the mean over one micro-batch's target tokens.
When a global batch is split into micro-batches with different numbers of target tokens,
averaging those means weights each token by 1/len(its micro-batch); the exact token-weighted
average needs the sum and the count carried separately, which
``language_model_loss_sum_and_count`` gives (sum the pairs over micro-batches and ranks, then
divide once).
"""

from typing import Tuple

import torch

from aligner.objectives.masked import masked_mean, masked_sum


def masked_language_model_loss(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens ``loss_mask`` selects.

    Args:
        token_logprobs: ``[batch, seq]`` log-probabilities of the labels.
        loss_mask: ``[batch, seq]``, 1 on tokens to learn (typically the response), 0 on prompt
            and padding.
    Returns:
        scalar float32; 0 when no token is selected.
    """
    return -masked_mean(token_logprobs, loss_mask)


def language_model_loss_sum_and_count(
    token_logprobs: torch.Tensor, loss_mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood and the number of selected tokens.

    Args:
        token_logprobs, loss_mask: ``[batch, seq]`` as in ``masked_language_model_loss``.
    Returns:
        ``(sum_nll, n_tokens)``, two float32 scalars. ``sum_nll / n_tokens`` is the mean loss;
        ``n_tokens`` is the (weighted) mask sum and carries no gradient.
    """
    sum_nll = -masked_sum(token_logprobs, loss_mask)
    n_tokens = masked_sum(torch.ones_like(loss_mask, dtype=sum_nll.dtype), loss_mask)
    return sum_nll, n_tokens
