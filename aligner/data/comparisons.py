"""Preference pairs (chosen vs rejected answer) for reward models and DPO-family losses.

Three file formats, detected per file from the first record (mixing them is an error):

* ``{"prompt", "chosen", "rejected"}`` with optional numeric ``chosen_reward`` and
  ``rejected_reward`` (ground-truth rewards, used by RPO-style losses);
* ReaLHF ``{"prompt", "pos_answers": [...], "neg_answers": [...]}``: ``pos_answers[i]``
  is preferred over ``neg_answers[i]``, one pair per index;
* NeMo alternating ``{"text": full_text}``: record ``2k`` is chosen, ``2k+1`` rejected.
  The prompt is not marked, so the longest common token prefix of the two texts is taken
  as the prompt (identical positions cancel in DPO's log-ratio anyway).

With ``model.data.apply_chat_template=true`` the pairs are conversations rendered with the
tokenizer's chat template, in the forms TRL and OpenRLHF use:

* ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``: the prompt
  conversation, then each answer (usually one assistant message);
* ``{"chosen": [conversation], "rejected": [conversation]}``: two whole conversations that
  share every message but the last (TRL's implicit prompt);
* a string ``prompt`` is one user message and a string answer one assistant message, so the
  plain format above (and ReaLHF's) can be rendered through a chat template too.

Each side's completion is its last message (which must be the assistant's) as the template
renders it; everything before it, with the generation prompt, is the prompt. The alternating
``{"text"}`` format has no roles and is refused.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from aligner.data.chat import (
    CHAT_TEMPLATE_KEY,
    conversation_hint,
    read_conversation_field,
    render_completion,
    require_chat_template,
)
from aligner.data.errors import DataFormatError
from aligner.data.jsonl import PathLike, iter_jsonl
from aligner.data.tokenizer import Tokenizer
from aligner.data.truncation import check_max_seq_length, check_truncation_mode, fit_answer, log_length_filtering

FORMAT_PAIRS = "prompt/chosen/rejected"
FORMAT_REALHF = "prompt/pos_answers/neg_answers"
FORMAT_ALTERNATING = "alternating text"


def detect_comparison_format(record: dict, path: str, line: int) -> str:
    """Name of the comparison format of one record (see module docstring)."""
    if "chosen" in record or "rejected" in record:
        return FORMAT_PAIRS
    if "pos_answers" in record or "neg_answers" in record:
        return FORMAT_REALHF
    if "text" in record:
        return FORMAT_ALTERNATING
    raise DataFormatError(
        path,
        "not a comparison record; expected {'prompt', 'chosen', 'rejected'}, "
        "{'prompt', 'pos_answers', 'neg_answers'} or alternating {'text'} lines; "
        f"the record has {sorted(record) or 'no fields'}",
        line,
    )


def _string_field(record: dict, key: str, path: str, line: int) -> str:
    if key not in record:
        raise DataFormatError(path, f"missing field {key!r}; the record has {sorted(record)}", line)
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(
            path, f"field {key!r} must be a string, got {type(value).__name__}{conversation_hint(record)}", line
        )
    return value


def _chat_pair(record: dict, path: str, line: int) -> Tuple[list, list]:
    """Whole chosen and rejected conversations of one record in a TRL/OpenRLHF chat form."""
    chosen = read_conversation_field(record, "chosen", "assistant", path, line)
    rejected = read_conversation_field(record, "rejected", "assistant", path, line)
    if "prompt" in record:
        prompt = read_conversation_field(record, "prompt", "user", path, line)
        return prompt + chosen, prompt + rejected
    if chosen[:-1] != rejected[:-1]:
        raise DataFormatError(
            path, "without a 'prompt' field, 'chosen' and 'rejected' must be the same conversation up to their "
            "last (assistant) message", line,
        )
    return chosen, rejected


def _reward_field(record: dict, key: str, path: str, line: int) -> float:
    value = record.get(key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(path, f"field {key!r} must be a finite number, got {value!r}", line)
    return float(value)


# One parsed pair before tokenization: (prompt or None if unknown, chosen, rejected,
# chosen_reward, rejected_reward, line). With a prompt, chosen/rejected are answers;
# without one (alternating format) they are full texts. With ``chat=True`` the prompt is
# None and chosen/rejected are whole conversations (lists of messages).
_RawPair = Tuple[Optional[str], Union[str, list], Union[str, list], float, float, int]


def read_comparison_pairs(path: PathLike, chat: bool = False) -> Tuple[str, List[_RawPair]]:
    """Parse a comparison file into raw pairs; returns ``(format_name, pairs)``."""
    path = os.fspath(path)
    file_format: Optional[str] = None
    first_line = 0
    pairs: List[_RawPair] = []
    pending: Optional[Tuple[str, int]] = None  # alternating format: chosen text awaiting its rejected line

    for line, record in iter_jsonl(path):
        fmt = detect_comparison_format(record, path, line)
        if file_format is None:
            file_format, first_line = fmt, line
        elif fmt != file_format:
            raise DataFormatError(
                path, f"record is in {fmt} format but line {first_line} is in {file_format} format; "
                "use one format per file", line,
            )
        if chat and fmt == FORMAT_ALTERNATING:
            raise DataFormatError(
                path, f"the alternating {{'text'}} format has no roles to render with a chat template; "
                f"write {{'prompt', 'chosen', 'rejected'}} records or set {CHAT_TEMPLATE_KEY}=false", line,
            )
        if chat and fmt == FORMAT_PAIRS:
            chosen, rejected = _chat_pair(record, path, line)
            chosen_reward = _reward_field(record, "chosen_reward", path, line)
            rejected_reward = _reward_field(record, "rejected_reward", path, line)
            if math.isnan(chosen_reward) != math.isnan(rejected_reward):
                raise DataFormatError(path, "give both 'chosen_reward' and 'rejected_reward' or neither", line)
            pairs.append((None, chosen, rejected, chosen_reward, rejected_reward, line))
        elif fmt == FORMAT_PAIRS:
            prompt = _string_field(record, "prompt", path, line)
            chosen = _string_field(record, "chosen", path, line)
            rejected = _string_field(record, "rejected", path, line)
            chosen_reward = _reward_field(record, "chosen_reward", path, line)
            rejected_reward = _reward_field(record, "rejected_reward", path, line)
            if math.isnan(chosen_reward) != math.isnan(rejected_reward):
                raise DataFormatError(path, "give both 'chosen_reward' and 'rejected_reward' or neither", line)
            pairs.append((prompt, chosen, rejected, chosen_reward, rejected_reward, line))
        elif fmt == FORMAT_REALHF:
            prompt = _string_field(record, "prompt", path, line)
            pos, neg = record.get("pos_answers"), record.get("neg_answers")
            for key, value in (("pos_answers", pos), ("neg_answers", neg)):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise DataFormatError(path, f"field {key!r} must be a list of strings", line)
            if len(pos) != len(neg):
                raise DataFormatError(
                    path, f"'pos_answers' has {len(pos)} entries but 'neg_answers' has {len(neg)}; "
                    "they are paired by index and must have the same length", line,
                )
            if not pos:
                raise DataFormatError(path, "'pos_answers' and 'neg_answers' are empty", line)
            for chosen, rejected in zip(pos, neg):
                if chat:
                    user = [{"role": "user", "content": prompt}]
                    pairs.append((None, user + [{"role": "assistant", "content": chosen}],
                                  user + [{"role": "assistant", "content": rejected}], math.nan, math.nan, line))
                else:
                    pairs.append((prompt, chosen, rejected, math.nan, math.nan, line))
        else:
            text = _string_field(record, "text", path, line)
            if pending is None:
                pending = (text, line)
            else:
                pairs.append((None, pending[0], text, math.nan, math.nan, pending[1]))
                pending = None

    if pending is not None:
        raise DataFormatError(
            path, f"odd number of records in alternating {{'text'}} format: the chosen text on line {pending[1]} "
            "(the last record) has no rejected text after it", pending[1],
        )
    if file_format is None:
        raise DataFormatError(path, "contains no records")
    return file_format, pairs


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ComparisonDataset(Dataset):
    """Tokenized preference pairs, all held in memory.

    Item::

        {"chosen": LongTensor[Lc], "rejected": LongTensor[Lr],
         "chosen_prompt_len": int, "rejected_prompt_len": int,
         "chosen_reward": float, "rejected_reward": float}   # nan when not given

    Tokens are ``prompt + answer (+ eos)``, prompt and answer tokenized separately. Positions
    ``>= prompt_len`` are the answer, which DPO-style losses score.

    Over-long pairs (either side longer than ``max_seq_length``): ``"truncate"`` cuts the end
    of the long answer(s), keeping at least one answer token per side (otherwise the pair is
    dropped); ``"drop"`` drops the pair. ``num_truncated``/``num_dropped`` count pairs.

    ``apply_chat_template=True``: see the module docstring; each side's tokens are exactly the
    tokenizer's ``apply_chat_template`` of its whole conversation (no eos or bos added: the
    template writes its own), and ``prompt_len`` ends where the last assistant turn begins.
    """

    def __init__(
        self,
        path: PathLike,
        tokenizer: Tokenizer,
        max_seq_length: int,
        truncation: str = "truncate",
        add_eos: bool = True,
        add_bos: bool = False,
        apply_chat_template: bool = False,
    ):
        self.path = os.fspath(path)
        self.max_seq_length = check_max_seq_length(max_seq_length)
        self.truncation = check_truncation_mode(truncation)
        self.apply_chat_template = bool(apply_chat_template)
        if self.apply_chat_template:
            require_chat_template(tokenizer)
        self.num_truncated = 0
        self.num_dropped = 0
        self.format, raw_pairs = read_comparison_pairs(self.path, chat=self.apply_chat_template)
        eos = [tokenizer.eos_id] if add_eos else []
        # (chosen tokens, rejected tokens, chosen prompt len, rejected prompt len, rewards)
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor, int, int, float, float]] = []

        for prompt, chosen, rejected, chosen_reward, rejected_reward, line in raw_pairs:
            if self.apply_chat_template:
                sides = []
                for name, conversation in (("chosen", chosen), ("rejected", rejected)):
                    ids, prompt_len = render_completion(tokenizer, conversation, self.path, line, name)
                    sides.append((ids[:prompt_len], ids[prompt_len:]))
            elif prompt is not None:
                prompt_ids = tokenizer.encode(prompt, add_bos=add_bos)
                sides = [(prompt_ids, tokenizer.encode(chosen) + eos), (prompt_ids, tokenizer.encode(rejected) + eos)]
            else:
                full_c = tokenizer.encode(chosen, add_bos=add_bos) + eos
                full_r = tokenizer.encode(rejected, add_bos=add_bos) + eos
                # Keep >= 1 answer token per side even if one text is a prefix of the other.
                n = min(common_prefix_length(full_c, full_r), len(full_c) - 1, len(full_r) - 1)
                n = max(n, 0)
                sides = [(full_c[:n], full_c[n:]), (full_r[:n], full_r[n:])]
            for name, (_, answer_ids) in zip(("chosen", "rejected"), sides):
                if not answer_ids:
                    raise DataFormatError(self.path, f"the {name} answer is empty", line)

            if any(len(p) + len(a) > self.max_seq_length for p, a in sides):
                fitted = [fit_answer(len(p), a, self.max_seq_length) for p, a in sides]
                if self.truncation == "drop" or any(f is None for f in fitted):
                    self.num_dropped += 1
                    continue
                sides = [(p, f) for (p, _), f in zip(sides, fitted)]
                self.num_truncated += 1

            (pc, ac), (pr, ar) = sides
            self._pairs.append(
                (
                    torch.tensor(pc + ac, dtype=torch.long),
                    torch.tensor(pr + ar, dtype=torch.long),
                    len(pc),
                    len(pr),
                    chosen_reward,
                    rejected_reward,
                )
            )

        log_length_filtering(
            self.path, len(raw_pairs), self.num_truncated, self.num_dropped, self.max_seq_length,
            self.truncation, what="pairs",
        )
        if not self._pairs:
            raise DataFormatError(
                self.path,
                f"no usable comparison pairs: all {len(raw_pairs)} are longer than "
                f"model.data.max_seq_length={self.max_seq_length}",
            )

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, int, float]]:
        chosen, rejected, chosen_prompt_len, rejected_prompt_len, chosen_reward, rejected_reward = self._pairs[index]
        return {
            "chosen": chosen,
            "rejected": rejected,
            "chosen_prompt_len": chosen_prompt_len,
            "rejected_prompt_len": rejected_prompt_len,
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
        }
