"""Supervised fine-tuning data: prompt/answer pairs with a mask over the answer tokens.

Accepted record shapes (detected per line): ``{"prompt": ..., "answer": ...}`` and
``{"input": ..., "output": ...}`` (the NeMo-Aligner SFT field names). With
``model.data.apply_chat_template=true`` also ``{"messages": [{"role", "content"}, ...]}``
(the last message must be the assistant's), and the string pairs above are rendered as one
user turn and one assistant turn.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from aligner.data.chat import (
    check_no_prompt_template,
    conversation_hint,
    read_messages,
    render_with_assistant_mask,
    require_chat_template,
)
from aligner.data.errors import DataFormatError
from aligner.data.jsonl import PathLike, iter_jsonl
from aligner.data.tokenizer import Tokenizer
from aligner.data.truncation import (
    apply_prompt_template,
    check_max_seq_length,
    check_prompt_template,
    check_truncation_mode,
    fit_answer,
    log_length_filtering,
)

SFT_KEY_PAIRS: Tuple[Tuple[str, str], ...] = (("prompt", "answer"), ("input", "output"))


def read_sft_pair(record: dict, path: str, line: int) -> Tuple[str, str]:
    """The ``(prompt, answer)`` strings of one SFT record, whichever key pair it uses."""
    for prompt_key, answer_key in SFT_KEY_PAIRS:
        if prompt_key in record and answer_key in record:
            prompt, answer = record[prompt_key], record[answer_key]
            for key, value in ((prompt_key, prompt), (answer_key, answer)):
                if not isinstance(value, str):
                    raise DataFormatError(path, f"field {key!r} must be a string, got {type(value).__name__}", line)
            return prompt, answer
    accepted = " or ".join("{%s}" % ", ".join(repr(k) for k in pair) for pair in SFT_KEY_PAIRS)
    raise DataFormatError(
        path, f"expected fields {accepted}; the record has {sorted(record) or 'no fields'}{conversation_hint(record)}",
        line,
    )


def read_sft_conversation(record: dict, path: str, line: int) -> list:
    """The messages of one SFT record under a chat template; the last one must be the assistant's."""
    if "messages" in record:
        messages = read_messages(record["messages"], path, line, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataFormatError(
                path, f"messages[{len(messages) - 1}] is a {messages[-1]['role']!r} turn; the last message of an SFT "
                "conversation must be the assistant's (there is nothing to train on after it)", line,
            )
        return messages
    prompt, answer = read_sft_pair(record, path, line)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


class SFTDataset(Dataset):
    """Tokenized prompt/answer samples, all held in memory.

    Item: ``{"tokens": LongTensor[L], "loss_mask": BoolTensor[L]}`` with ``L <= max_seq_length``.
    ``loss_mask[i]`` is True iff token ``i`` belongs to the answer (including the final eos).
    A causal LM predicts token ``i`` from tokens ``< i``, so trainers pair ``loss_mask[1:]``
    with targets ``tokens[1:]`` (``collate_sft`` does this shift).

    Prompt and answer are tokenized separately and concatenated, so the mask boundary is
    exact even where BPE would merge across it; the answer text should carry its own
    leading space if one is wanted.

    Over-long samples: ``truncation="truncate"`` cuts the end of the answer (the eos is
    lost; at least one answer token is kept, otherwise the sample is dropped),
    ``"drop"`` drops the sample. ``num_truncated`` and ``num_dropped`` count them.

    ``apply_chat_template=True``: each record is a conversation rendered with the tokenizer's
    chat template (token ids exactly as ``apply_chat_template``; ``add_bos``/``add_eos`` are
    ignored, the template writes its own special tokens) and ``loss_mask`` is True on every
    assistant turn, including the end-of-turn token the template emits (see
    ``aligner.data.chat.render_with_assistant_mask``). Truncation cuts the end of the
    conversation and keeps the sample if any assistant token is left.
    """

    def __init__(
        self,
        path: PathLike,
        tokenizer: Tokenizer,
        max_seq_length: int,
        prompt_template: Optional[str] = None,
        truncation: str = "truncate",
        add_eos: bool = True,
        add_bos: bool = False,
        apply_chat_template: bool = False,
    ):
        self.path = os.fspath(path)
        self.max_seq_length = check_max_seq_length(max_seq_length)
        self.truncation = check_truncation_mode(truncation)
        self.prompt_template = check_prompt_template(prompt_template)
        self.apply_chat_template = bool(apply_chat_template)
        if self.apply_chat_template:
            check_no_prompt_template(self.prompt_template, True)
            require_chat_template(tokenizer)
        self.num_truncated = 0
        self.num_dropped = 0
        self._samples: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (tokens [L], loss mask [L])

        total = 0
        for line, record in iter_jsonl(self.path):
            if self.apply_chat_template:
                total += 1
                self._add_conversation(tokenizer, read_sft_conversation(record, self.path, line), line)
                continue
            prompt, answer = read_sft_pair(record, self.path, line)
            total += 1
            prompt_ids = tokenizer.encode(apply_prompt_template(self.prompt_template, prompt), add_bos=add_bos)
            answer_ids = tokenizer.encode(answer)
            if add_eos:
                answer_ids.append(tokenizer.eos_id)
            if not answer_ids:
                raise DataFormatError(self.path, "the answer is empty, so there is nothing to train on", line)
            if len(prompt_ids) + len(answer_ids) > self.max_seq_length:
                fitted = fit_answer(len(prompt_ids), answer_ids, self.max_seq_length)
                if self.truncation == "drop" or fitted is None:
                    self.num_dropped += 1
                    continue
                answer_ids = fitted
                self.num_truncated += 1
            mask = [False] * len(prompt_ids) + [True] * len(answer_ids)
            self._samples.append((torch.tensor(prompt_ids + answer_ids, dtype=torch.long),
                                  torch.tensor(mask, dtype=torch.bool)))

        log_length_filtering(
            self.path, total, self.num_truncated, self.num_dropped, self.max_seq_length, self.truncation
        )
        if not self._samples:
            reason = (
                f"all {total} samples are longer than model.data.max_seq_length={self.max_seq_length}"
                if total
                else "it contains no records"
            )
            raise DataFormatError(self.path, f"no usable SFT samples: {reason}")

    def _add_conversation(self, tokenizer: Tokenizer, messages: list, line: int) -> None:
        ids, mask = render_with_assistant_mask(tokenizer, messages, self.path, line)
        if len(ids) > self.max_seq_length:
            if self.truncation == "drop" or not any(mask[: self.max_seq_length]):
                self.num_dropped += 1
                return
            ids, mask = ids[: self.max_seq_length], mask[: self.max_seq_length]
            self.num_truncated += 1
        self._samples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        tokens, loss_mask = self._samples[index]
        return {"tokens": tokens, "loss_mask": loss_mask.clone()}

    def lengths(self) -> List[int]:
        """Token count of every sample, e.g. for length-grouped batching."""
        return [tokens.numel() for tokens, _ in self._samples]
