"""Prompts for on-policy generation (PPO rollouts, evaluation samples).

Records are ``{"prompt": str}``; ``{"text": str}`` and ``{"input": str}`` are accepted as
synonyms so SFT and NeMo-style files can be reused. Other fields (e.g. an arithmetic task's
``answer``) travel with the prompt as ``fields``: reward functions receive them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from aligner.data.errors import DataFormatError
from aligner.data.jsonl import PathLike, iter_jsonl
from aligner.data.tokenizer import Tokenizer
from aligner.data.truncation import apply_prompt_template, check_prompt_template, check_truncation_mode, log_length_filtering

PROMPT_KEYS = ("prompt", "text", "input")


def prompt_key(record: dict) -> str | None:
    return next((key for key in PROMPT_KEYS if key in record), None)


def read_prompt(record: dict, path: str, line: int) -> str:
    for key in PROMPT_KEYS:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise DataFormatError(path, f"field {key!r} must be a string, got {type(value).__name__}", line)
            return value
    raise DataFormatError(
        path, f"expected one of the fields {', '.join(repr(k) for k in PROMPT_KEYS)}; "
        f"the record has {sorted(record) or 'no fields'}", line,
    )


class PromptDataset(Dataset):
    """Tokenized prompts, all held in memory.

    Item: ``{"prompt_tokens": LongTensor[P], "text": str, "index": int, "fields": dict}`` where ``text`` is
    the prompt as written in the file (before the template) and ``index`` is the item's
    position in this dataset (stable across runs, usable to join generations back to
    prompts).

    Prompts longer than ``max_prompt_length`` tokens are cut from the LEFT with
    ``truncation="truncate"`` (the end of a prompt is what the continuation depends on;
    a bos token, if added, is kept in front) or dropped with ``"drop"``.
    """

    def __init__(
        self,
        path: PathLike,
        tokenizer: Tokenizer,
        max_prompt_length: int,
        prompt_template: Optional[str] = None,
        truncation: str = "truncate",
        add_bos: bool = False,
        truncation_config_key: str = "model.data.truncation",
    ):
        self.path = os.fspath(path)
        self.max_prompt_length = int(max_prompt_length)
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1")
        self.truncation = check_truncation_mode(truncation, truncation_config_key)
        self.prompt_template = check_prompt_template(prompt_template)
        self.num_truncated = 0
        self.num_dropped = 0
        self._items: List[Tuple[torch.Tensor, str, dict]] = []

        total = 0
        for line, record in iter_jsonl(self.path):
            text = read_prompt(record, self.path, line)
            total += 1
            ids = tokenizer.encode(apply_prompt_template(self.prompt_template, text), add_bos=False)
            bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
            if not ids and not bos:
                raise DataFormatError(self.path, "the prompt is empty; generation needs at least one token", line)
            if len(bos) + len(ids) > self.max_prompt_length:
                keep = self.max_prompt_length - len(bos)
                if self.truncation == "drop" or keep < 1:
                    self.num_dropped += 1
                    continue
                ids = ids[len(ids) - keep:]
                self.num_truncated += 1
            key = prompt_key(record)
            self._items.append((torch.tensor(bos + ids, dtype=torch.long), text,
                                {k: v for k, v in record.items() if k != key}))

        log_length_filtering(
            self.path, total, self.num_truncated, self.num_dropped, self.max_prompt_length, self.truncation,
            what="prompts", config_key=truncation_config_key,
        )
        if not self._items:
            reason = f"all {total} are longer than max_prompt_length={self.max_prompt_length}" if total else "it contains no records"
            raise DataFormatError(self.path, f"no usable prompts: {reason}")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str, int]]:
        tokens, text, fields = self._items[index]
        return {"prompt_tokens": tokens, "text": text, "index": int(index), "fields": fields}
