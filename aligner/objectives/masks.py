"""Masks that select positions of a right-padded batch of ``prompt + response`` rows.

Layout: row ``b`` holds ``prompt_lengths[b]`` prompt tokens, then its response, then padding;
``lengths[b] = prompt + response``. Log-probabilities follow the next-token convention: position
``t`` holds ``log p(token t+1 | tokens <= t)``, so the response tokens ``P .. L-1`` are predicted
at positions ``P-1 .. L-2``. The other objectives in this package index ``[batch, T]`` tensors
this way.
"""

import torch


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """True at positions ``t < lengths[b]``.

    Args:
        lengths: ``[batch]`` integer lengths.
        width: ``T``, the padded width.
    Returns:
        ``[batch, T]`` bool.
    """
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """1.0 at the positions whose next-token log-prob is that of a response token.

    Position ``t`` predicts token ``t + 1``, so the mask is 1 for ``P - 1 <= t <= L - 2``
    (``P`` = prompt length, ``L`` = prompt + response length). A row with an empty response is
    all zeros.

    Args:
        prompt_lengths: ``[batch]``.
        lengths: ``[batch]`` prompt + response lengths.
        width: ``T``, the padded width of the log-prob tensors.
    Returns:
        ``[batch, T]`` float32.
    """
    t = torch.arange(width, device=lengths.device).unsqueeze(0)
    return ((t + 1 >= prompt_lengths.unsqueeze(1)) & (t + 1 < lengths.unsqueeze(1))).float()


def first_masked_column(mask: torch.Tensor) -> int:
    """The first column where any row of ``[batch, T]`` ``mask`` is set (0 when none is).

    Losses and log-probs only need the vocabulary projection's log-softmax from there on: the
    prompt columns before it count for nothing."""
    columns = mask.any(0).nonzero()
    return int(columns[0]) if len(columns) else 0
