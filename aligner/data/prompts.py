"""Prompts for on-policy generation (PPO rollouts, evaluation samples).

Records are ``{"prompt": str}``; ``{"text": str}`` and ``{"input": str}`` are accepted as
synonyms so SFT and NeMo-style files can be reused. Other fields (e.g. an arithmetic task's
``answer``) travel with the prompt as ``fields``: reward functions receive them.

With ``model.data.apply_chat_template=true`` a prompt is a conversation rendered with the
tokenizer's chat template and its generation prompt: ``{"messages": [...]}`` or
``{"prompt": [...]}`` (a message list not ending with the assistant), or a string prompt
taken as one user message.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from aligner.data.chat import (
    check_no_prompt_template,
    conversation_hint,
    read_conversation_field,
    render_generation_prompt,
    require_chat_template,
)
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
                raise DataFormatError(
                    path, f"field {key!r} must be a string, got {type(value).__name__}{conversation_hint(record)}", line
                )
            return value
    raise DataFormatError(
        path, f"expected one of the fields {', '.join(repr(k) for k in PROMPT_KEYS)}; "
        f"the record has {sorted(record) or 'no fields'}{conversation_hint(record)}", line,
    )


def read_chat_prompt(record: dict, path: str, line: int) -> tuple:
    """``(key, messages)`` of one prompt record under a chat template."""
    key = "messages" if "messages" in record else prompt_key(record)
    if key is None:
        raise DataFormatError(
            path, f"expected a 'messages' field or one of {', '.join(repr(k) for k in PROMPT_KEYS)}; "
            f"the record has {sorted(record) or 'no fields'}", line,
        )
    return key, read_conversation_field(record, key, "user", path, line)


class PromptDataset(Dataset):
    """Tokenized prompts, all held in memory.

    Item: ``{"prompt_tokens": LongTensor[P], "text": str, "index": int, "fields": dict}`` where ``text`` is
    the prompt as written in the file (before the template) and ``index`` is the item's
    position in this dataset (stable across runs, usable to join generations back to
    prompts).

    Prompts longer than ``max_prompt_length`` tokens are cut from the LEFT with
    ``truncation="truncate"`` (the end of a prompt is what the continuation depends on;
    a bos token, if added, is kept in front) or dropped with ``"drop"``.

    ``apply_chat_template=True``: the tokens are the chat template's rendering with
    ``add_generation_prompt=True`` (``add_bos`` is ignored: the template writes its own
    special tokens); ``text`` is the content of the last message.
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
        apply_chat_template: bool = False,
    ):
        self.path = os.fspath(path)
        self.max_prompt_length = int(max_prompt_length)
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1")
        self.truncation = check_truncation_mode(truncation, truncation_config_key)
        self.prompt_template = check_prompt_template(prompt_template)
        self.apply_chat_template = bool(apply_chat_template)
        if self.apply_chat_template:
            check_no_prompt_template(self.prompt_template, True)
            require_chat_template(tokenizer)
            add_bos = False
        self.num_truncated = 0
        self.num_dropped = 0
        self._items: List[Tuple[torch.Tensor, str, dict]] = []

        total = 0
        for line, record in iter_jsonl(self.path):
            if self.apply_chat_template:
                key, messages = read_chat_prompt(record, self.path, line)
                text = messages[-1]["content"]
                ids = render_generation_prompt(tokenizer, messages, self.path, line, key)
            else:
                key = prompt_key(record)
                text = read_prompt(record, self.path, line)
                ids = tokenizer.encode(apply_prompt_template(self.prompt_template, text), add_bos=False)
            total += 1
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
