"""Choosing the next token from logits: pure tensor functions, no model, no communication.

Order of operations for one step (what NeMo's sampler does too):
  raw logits -> suppress EOS below min_length -> (greedy: argmax)
             -> / temperature -> top-k -> top-p -> sample from the softmax.
`token_logprobs` is taken from the *raw* logits, i.e. the model's own distribution, which is
what PPO's trainer recomputes; the tempered/filtered distribution is only a sampling device.

Speed without changing results: each step touches the [B, V] logits as few times as the maths
allows. A temperature of 1 divides nothing (x / 1.0 == x exactly), disabled filters copy
nothing, EOS suppression can write one column in place (`suppress_eos_`, keeping the original
column so log-probs of the raw logits stay exact), and filtering works in place on tensors the
step already owns. Every draw and every log-prob is bit-identical to the plain formulation
(tests/unit/test_generation_sampling.py and test_generation_sampler.py compare them).
"""
from __future__ import annotations

import torch

from aligner.generation.params import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """[B,V] -> [B,V]: logits outside the top-k / nucleus set become -inf.

    Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all stay).
    Top-p then works on the distribution renormalised over what top-k kept: in descending order
    a token is kept while the mass of the tokens *before* it is < top_p, so the most likely
    token always survives and the kept set is the smallest one with mass >= top_p.
    top_k=0 and top_p=1.0 disable the respective filter.
    Returns a new tensor, or with `inplace=True` writes into `logits` and returns it.
    """
    out = logits if inplace else logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out.masked_fill_(out < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1).sub_(probs)
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # never empty the set, whatever rounding does
        # `order` is a permutation of each row: every position is written exactly once
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out.masked_fill_(drop, float("-inf"))
    return out


def suppress_eos(logits: torch.Tensor, eos_id: int, step, min_length: int) -> torch.Tensor:
    """[B,V] -> [B,V]: forbid EOS for rows that have generated fewer than `min_length` tokens.

    `step` is the number of tokens each row has generated so far: an int for the whole batch
    or a [B] tensor (rows of a mixed-length batch start generating at different steps).
    Returns `logits` itself when no row is affected, else a new tensor.
    """
    if min_length <= 0:
        return logits
    too_short = torch.as_tensor(step, device=logits.device) < min_length
    if not too_short.any():
        return logits
    out = logits.clone()
    suppress_eos_(out, eos_id, too_short.expand(out.shape[:-1]))
    return out


def suppress_eos_(logits: torch.Tensor, eos_id: int, rows: torch.Tensor) -> torch.Tensor:
    """In place: logits[rows, eos_id] = -inf for the [B] bool `rows`. Returns the EOS column as it
    was ([B], a copy), for `token_logprobs(..., eos_id=, eos_column=)` of the raw logits."""
    column = logits[..., eos_id]
    original = column.clone()
    column.masked_fill_(rows, float("-inf"))
    return original


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B,V] (rows need not sum to 1), uniform [B] in [0,1) -> [B] ids.

    Picks the first token whose cumulative mass exceeds `uniform * total`. Tokens with zero
    probability are never chosen (their cumulative mass equals their predecessor's). The
    cumulative sum is float64 so the last bins are not lost to float32 rounding.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    target = (uniform.double() * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """[B,V] logits (EOS suppression already applied) -> [B] next-token ids. `logits` is not modified.

    `uniform` ([B] in [0, 1), e.g. from aligner.generation.streams) supplies the draws; without
    it exactly B uniforms come from `generator` per call, even when greedy or when some rows are
    finished, so that two code paths stepping the same batch (KV cache vs full recomputation, or
    every tensor-parallel rank) stay in lock-step on the random stream.
    """
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float()
    if params.temperature != 1.0:
        scaled = scaled / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        scaled = filter_logits(scaled, params.top_k, params.top_p, inplace=scaled is not logits)
    return sample_from_probs(torch.softmax(scaled, dim=-1), uniform)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, logsumexp: torch.Tensor | None = None,
                   eos_id: int | None = None, eos_column: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits)[token] in float32: logits [B,V], tokens [B] -> [B].

    `logsumexp` ([B], of the float32 logits) may be passed when it is already known. When the
    logits have had their EOS column overwritten in place since (`suppress_eos_`), pass the
    logsumexp taken before, `eos_id` and the returned original column: the result is then that
    of the raw logits.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if eos_column is not None:
        picked = torch.where(tokens == eos_id, eos_column.float(), picked)
    if logsumexp is None:
        logsumexp = torch.logsumexp(logits, dim=-1)
    return picked - logsumexp
