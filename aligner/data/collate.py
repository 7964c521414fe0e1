"""Batching: right-padding and the next-token shift of labels and loss masks.

All batches are right-padded: real tokens occupy ``[0, length)`` of each row. Labels and
loss masks are already shifted so that position ``i`` of ``labels``/``loss_mask`` refers
to the prediction made from position ``i`` of ``tokens`` (i.e. of token ``i + 1``); a
trainer can compare ``logits[:, i]`` with ``labels[:, i]`` directly.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch


def _padded_length(max_len: int, pad_to_multiple_of: Optional[int], pad_to_length: Optional[int]) -> int:
    length = max_len
    if pad_to_length is not None:
        if max_len > pad_to_length:
            raise ValueError(f"a sequence has {max_len} tokens, more than pad_to_length={pad_to_length}")
        length = pad_to_length
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length


def right_pad(
    seqs: Sequence[torch.Tensor],
    pad_id: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_to_length: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token tensors into ``tokens [B, S]`` (right-padded with ``pad_id``).

    ``S`` is the longest length, raised to ``pad_to_length`` if given, then rounded up to a
    multiple of ``pad_to_multiple_of`` (e.g. the tensor-parallel size for sequence
    parallelism). Returns ``(tokens [B, S] long, lengths [B] long)``.
    """
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    lengths = torch.tensor([int(s.numel()) for s in seqs], dtype=torch.long)
    width = _padded_length(int(lengths.max()), pad_to_multiple_of, pad_to_length)
    tokens = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens[row, : seq.numel()] = seq.reshape(-1)
    return tokens, lengths


def shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """``out[:, i] = x[:, i + 1]``, and ``out[:, -1] = fill``. Shape ``[B, S]`` kept."""
    out = torch.full_like(x, fill)
    out[:, :-1] = x[:, 1:]
    return out


def _answer_mask(lengths: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, S]`` bool, True at answer positions ``prompt_len <= j < length``."""
    positions = torch.arange(width).unsqueeze(0)
    return (positions >= prompt_lengths.unsqueeze(1)) & (positions < lengths.unsqueeze(1))


def collate_sft(
    items: List[Dict[str, torch.Tensor]],
    pad_id: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_to_length: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Batch SFTDataset items.

    Returns ``tokens [B, S]`` long, ``labels [B, S]`` long (tokens shifted left, last column
    ``pad_id``), ``loss_mask [B, S]`` float (the items' answer masks shifted the same way,
    0 on padding) and ``lengths [B]`` long.
    """
    tokens, lengths = right_pad([it["tokens"] for it in items], pad_id, pad_to_multiple_of, pad_to_length)
    answer = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, item in enumerate(items):
        mask = item["loss_mask"]
        answer[row, : mask.numel()] = mask
    return {
        "tokens": tokens,
        "labels": shift_left(tokens, int(pad_id)),
        "loss_mask": shift_left(answer, False).float(),
        "lengths": lengths,
    }


def collate_comparisons(
    items: List[Dict],
    pad_id: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_to_length: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Batch ComparisonDataset items as ``2B`` rows: all chosen rows, then all rejected rows.

    Row ``b`` and row ``B + b`` are the two sides of pair ``b``. Returns ``tokens [2B, S]``,
    ``labels [2B, S]``, ``loss_mask [2B, S]`` float (answer tokens only, shifted like
    ``collate_sft``), ``lengths [2B]``, ``prompt_lengths [2B]`` and ``gt_rewards [2B]``
    float (nan where the data gives no reward).
    """
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    tokens, lengths = right_pad(seqs, pad_id, pad_to_multiple_of, pad_to_length)
    prompt_lengths = torch.tensor(
        [it["chosen_prompt_len"] for it in items] + [it["rejected_prompt_len"] for it in items], dtype=torch.long
    )
    rewards = torch.tensor(
        [float(it["chosen_reward"]) for it in items] + [float(it["rejected_reward"]) for it in items],
        dtype=torch.float32,
    )
    answer = _answer_mask(lengths, prompt_lengths, tokens.shape[1])
    return {
        "tokens": tokens,
        "labels": shift_left(tokens, int(pad_id)),
        "loss_mask": shift_left(answer, False).float(),
        "lengths": lengths,
        "prompt_lengths": prompt_lengths,
        "gt_rewards": rewards,
    }


def collate_prompts(
    items: List[Dict],
    pad_id: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_to_length: Optional[int] = None,
) -> Dict[str, object]:
    """Batch PromptDataset items.

    Returns ``prompt_tokens [B, P]`` long (right-padded), ``prompt_lengths [B]`` long,
    ``index [B]`` long and ``text`` (list of B prompt strings).
    """
    tokens, lengths = right_pad([it["prompt_tokens"] for it in items], pad_id, pad_to_multiple_of, pad_to_length)
    return {
        "prompt_tokens": tokens,
        "prompt_lengths": lengths,
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        "text": [it["text"] for it in items],
    }
