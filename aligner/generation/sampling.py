"""Choosing the next token from logits: pure tensor functions, no model, no communication.

Order of operations for one step (what NeMo's sampler does too):
  raw logits -> suppress EOS below min_length -> (greedy: argmax)
             -> / temperature -> top-k -> top-p -> sample from the softmax.
`token_logprobs` is taken from the *raw* logits, i.e. the model's own distribution, which is
what PPO's trainer recomputes; the tempered/filtered distribution is only a sampling device.
"""
from __future__ import annotations

import torch

from aligner.generation.params import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B,V] -> [B,V]: logits outside the top-k / nucleus set become -inf (a new tensor).

    Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all stay).
    Top-p then works on the distribution renormalised over what top-k kept: in descending order
    a token is kept while the mass of the tokens *before* it is < top_p, so the most likely
    token always survives and the kept set is the smallest one with mass >= top_p.
    top_k=0 and top_p=1.0 disable the respective filter.
    """
    out = logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # never empty the set, whatever rounding does
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def suppress_eos(logits: torch.Tensor, eos_id: int, step, min_length: int) -> torch.Tensor:
    """[B,V] -> [B,V]: forbid EOS for rows that have generated fewer than `min_length` tokens.

    `step` is the number of tokens each row has generated so far: an int for the whole batch
    or a [B] tensor (rows of a mixed-length batch start generating at different steps).
    """
    if min_length <= 0:
        return logits
    too_short = torch.as_tensor(step, device=logits.device) < min_length
    if not too_short.any():
        return logits
    out = logits.clone()
    column = out[..., eos_id]
    out[..., eos_id] = torch.where(too_short, torch.full_like(column, float("-inf")), column)
    return out


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B,V] (rows need not sum to 1), uniform [B] in [0,1) -> [B] ids.

    Picks the first token whose cumulative mass exceeds `uniform * total`. Tokens with zero
    probability are never chosen (their cumulative mass equals their predecessor's). The
    cumulative sum is float64 so the last bins are not lost to float32 rounding.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (uniform.double() * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B,V] logits (EOS suppression already applied) -> [B] next-token ids.

    Always draws exactly B uniforms from `generator` per call, even when greedy or when some
    rows are finished, so that two code paths stepping the same batch (KV cache vs full
    recomputation, or every tensor-parallel rank) stay in lock-step on the random stream.
    """
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / params.temperature
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    return sample_from_probs(torch.softmax(filtered, dim=-1), uniform)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32: logits [B,V], tokens [B] -> [B]."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
