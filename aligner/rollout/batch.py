"""One step's experience on this data-parallel rank: what every online algorithm works on."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from aligner.data.collate import shift_left
from aligner.objectives.masks import response_mask


def pad_columns(tensor: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """[N, W] -> [N, width]: cut or right-pad with ``value``."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


@dataclass
class Rollouts:
    """Sampled responses, right-padded to a common length S.

    Samples of one prompt are consecutive (``group`` numbers the prompts of the batch, so a
    batch of G prompts with n samples each is ``[p0]*n + [p1]*n + ...``). Position t of a
    [N, S] per-token tensor refers to predicting token t+1 (``mask`` is 1 where that token is
    part of the response).
    """

    tokens: torch.Tensor  # [N,S] long
    lengths: torch.Tensor  # [N] prompt + response
    prompt_lengths: torch.Tensor  # [N]
    is_end: torch.Tensor  # [N] bool: stopped on EOS / an end string (not truncated)
    mask: torch.Tensor  # [N,S] float
    generator_logprobs: torch.Tensor  # [N,S] the sampler's log-probs of the sampled tokens
    group: torch.Tensor  # [N] long
    prompt_index: torch.Tensor  # [N] long: the prompt's index in its dataset
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)  # the prompt rows' other fields (e.g. "answer")
    logprobs: torch.Tensor | None = None  # [N,S] actor's "old" log-probs (the sampler's, checked, or recomputed); responses only
    ref_logprobs: torch.Tensor | None = None  # [N,S] reference policy
    rewards: torch.Tensor | None = None  # [N] float
    valid: torch.Tensor | None = None  # [N] bool: the scorer could score the sample
    values: torch.Tensor | None = None  # [N,S] critic values, when the scorer provides them
    baseline_rewards: torch.Tensor | None = None  # [G] e.g. ReMax's greedy-response rewards
    score_metrics: dict[str, float] = field(default_factory=dict)
    pending: Any = None  # the scorer's handles of requests in flight

    @property
    def labels(self) -> torch.Tensor:
        return shift_left(self.tokens, 0)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.lengths - self.prompt_lengths

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The rows ``rows`` ([K] long), every per-sample field with them; groups keep their ids."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name != "baseline_rewards":
                picked[f.name] = value[rows]
            elif isinstance(value, list) and len(value) == len(self):
                picked[f.name] = [value[int(i)] for i in rows]
        return replace(self, **picked)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """One batch from several (padded to the widest); group ids are renumbered to stay distinct."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.tokens.shape[1] for p in parts)
    out: dict[str, Any] = {}
    offset, groups = 0, []
    for p in parts:
        groups.append(p.group + offset)
        offset += int(p.group.max()) + 1 if len(p) else 0
    out["group"] = torch.cat(groups)
    for f in fields(Rollouts):
        if f.name in ("group", "pending", "score_metrics"):
            continue
        values = [getattr(p, f.name) for p in parts]
        if all(isinstance(v, list) for v in values):
            out[f.name] = [x for v in values for x in v]
        elif all(isinstance(v, torch.Tensor) for v in values):
            if values[0].dim() == 2 and f.name != "baseline_rewards":
                fill = pad_id if f.name == "tokens" else 0
                out[f.name] = torch.cat([pad_columns(v, width, fill) for v in values])
            else:
                out[f.name] = torch.cat(values)
        else:
            out[f.name] = None
    out["mask"] = response_mask(out["prompt_lengths"], out["lengths"], width)
    return Rollouts(**out)
