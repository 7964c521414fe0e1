"""Log-probabilities and entropies of tokens, from a model's logits.

Every algorithm starts here: SFT maximises the log-probability of the labels, DPO compares
sequence log-probabilities of two policies, PPO takes ratios of token log-probabilities.

The logits tensor ``[batch, seq, vocab]`` is by far the largest activation in a language model
(vocab ~ 32k-256k), so ``token_logprobs_from_logits`` never materialises a float32 copy of it
or a full ``log_softmax``: it computes ``logit[label] - logsumexp(logits)`` in row chunks and has
a hand-written backward (``softmax - onehot``, again chunked) that keeps only the original
logits and one float per token for the backward pass.

These functions assume the whole vocabulary is on one rank. Under tensor parallelism the vocab
dimension is split and the logsumexp needs a cross-rank reduction, which belongs to the model
side, not here.
"""

import torch

from aligner.objectives.masked import compute_dtype, masked_mean, masked_sum

# Rows (tokens) per chunk: 4096 tokens x 128k vocab x 4 bytes = 2 GiB of float32 at most,
# and far less for typical vocabularies. Small enough to bound the peak, large enough that the
# Python loop is negligible.
_DEFAULT_CHUNK_TOKENS = 4096


class _TokenLogProbs(torch.autograd.Function):
    """``log_softmax(logits)[label]`` with chunked float32 maths and an O(tokens) saved state."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1, 1)
        dtype = compute_dtype(logits)
        n_tokens = flat_logits.shape[0]
        out = torch.empty(n_tokens, dtype=dtype, device=logits.device)
        log_normalisers = torch.empty(n_tokens, dtype=dtype, device=logits.device)
        for start in range(0, n_tokens, chunk_tokens):
            stop = min(start + chunk_tokens, n_tokens)
            chunk = flat_logits[start:stop].to(dtype)
            lse = torch.logsumexp(chunk, dim=-1)
            out[start:stop] = chunk.gather(-1, flat_labels[start:stop]).squeeze(-1) - lse
            log_normalisers[start:stop] = lse
        ctx.save_for_backward(logits, labels, log_normalisers)
        ctx.chunk_tokens = chunk_tokens
        return out.reshape(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, log_normalisers = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1, 1)
        flat_grad = grad_out.reshape(-1, 1).to(log_normalisers.dtype)
        grad_logits = torch.empty_like(flat_logits)
        n_tokens = flat_logits.shape[0]
        for start in range(0, n_tokens, ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, n_tokens)
            chunk = flat_logits[start:stop].to(log_normalisers.dtype)
            softmax = torch.exp(chunk - log_normalisers[start:stop].unsqueeze(-1))
            g = flat_grad[start:stop]
            # d(logit[y] - lse)/d logit = onehot(y) - softmax
            grad_chunk = (-g * softmax).scatter_add_(-1, flat_labels[start:stop], g)
            grad_logits[start:stop] = grad_chunk.to(grad_logits.dtype)
        return grad_logits.reshape(logits.shape), None, None


def token_logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = _DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Log-probability the model assigns to each label token.

    Args:
        logits: ``[batch, seq, vocab]`` (any float dtype; bf16 is fine).
        labels: ``[batch, seq]`` integer token ids, already shifted so ``labels[:, t]`` is the
            token predicted by ``logits[:, t]``. Every id must lie in ``[0, vocab)``: replace
            ignore/padding ids (e.g. -100) with any valid id and mask those positions out later.
        chunk_tokens: tokens processed at once; bounds the temporary float32 memory.
    Returns:
        ``[batch, seq]`` float32 (float64 for float64 logits), differentiable w.r.t. ``logits``
        (first derivatives only).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must "
            "be [batch, seq, vocab] and labels [batch, seq]"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _TokenLogProbs.apply(logits, labels.long(), chunk_tokens)


def trailing_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whole-row ``[batch, seq]`` float32 log-probs from logits of the last ``seq - start``
    columns only (``next_token_logits(..., first_column=start)``); 0 in the first ``start``
    columns, which no loss reads. No gradient."""
    start = labels.shape[1] - logits.shape[1]
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    out[:, start:] = token_logprobs_from_logits(logits.float(), labels[:, start:]).detach()
    return out


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position.

    ``H = -sum_v p_v log p_v`` computed from ``log_softmax`` in float32. Logits must be finite
    (a ``-inf`` logit gives ``0 * -inf``). This materialises a float32 ``[batch, seq, vocab]``
    tensor; it is meant for an entropy bonus or a metric, not the main loss path.

    Args:
        logits: ``[batch, seq, vocab]``.
    Returns:
        ``[batch, seq]``, non-negative.
    """
    log_p = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def sequence_logprobs(
    token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool
) -> torch.Tensor:
    """Log-probability of each whole sequence, from its selected tokens.

    Args:
        token_logprobs: ``[batch, seq]``.
        mask: ``[batch, seq]``, 1 on the tokens that belong to the response.
        average: mean over the selected tokens (length-normalised, as in IPO/SimPO variants)
            instead of the sum (the true sequence log-probability, used by DPO). A row with no
            selected token gives 0 either way.
    Returns:
        ``[batch]``.
    """
    if average:
        return masked_mean(token_logprobs, mask, dim=-1)
    return masked_sum(token_logprobs, mask, dim=-1)
