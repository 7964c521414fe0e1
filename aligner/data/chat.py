"""Conversations rendered with the tokenizer's own chat template, and where the assistant speaks.

Used by the SFT, comparison and prompt datasets when ``model.data.apply_chat_template=true``.
A conversation is a list of ``{"role": ..., "content": ...}`` messages (the Hugging Face /
TRL / OpenRLHF format). The token ids are exactly those of the tokenizer's
``apply_chat_template`` (the rendered text tokenized as a whole), so a model sees the same
ids here as it will at inference.

Finding the assistant turns: chat templates do not say which characters belong to which
message, so a turn is located by rendering prefixes of the conversation. Assistant turn ``i``
starts where ``messages[:i]`` rendered with the generation prompt ends, and ends where
``messages[:i+1]`` rendered ends; characters map to tokens through the tokenizer's offsets.
This needs every prefix to render as a prefix of the whole (true of ChatML, Llama, Mistral
templates); a template that rewrites earlier turns (e.g. strips old reasoning) is refused.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from aligner.data.errors import DataFormatError
from aligner.data.tokenizer import Tokenizer

CHAT_TEMPLATE_KEY = "model.data.apply_chat_template"
ROLES = ("system", "user", "assistant", "tool")

Message = dict


def require_chat_template(tokenizer: Tokenizer) -> None:
    """Raise ValueError naming the config key and the tokenizer when there is no chat template."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"{CHAT_TEMPLATE_KEY}=true but the tokenizer {tokenizer.name} has no chat template "
            "(no \"chat_template\" in its tokenizer_config.json nor a chat_template.jinja file); "
            f"set {CHAT_TEMPLATE_KEY}=false and use model.data.prompt_template, or use a tokenizer that has one"
        )


def conversation_hint(record: dict) -> str:
    """A hint to append to a format error when a record looks conversational but the flag is off."""
    if "messages" in record or any(isinstance(record.get(k), list) and record.get(k) and
                                   isinstance(record[k][0], dict) for k in ("prompt", "chosen", "rejected")):
        return f"; this looks like a conversation: set {CHAT_TEMPLATE_KEY}=true to render it with the tokenizer's chat template"
    return ""


def read_messages(value: Any, path: str, line: int, field: str) -> List[Message]:
    """Validate one message list from a record; errors name ``path:line`` and ``field[i]``."""
    if not isinstance(value, list):
        raise DataFormatError(
            path, f"field {field!r} must be a list of {{'role', 'content'}} messages, got {type(value).__name__}", line
        )
    if not value:
        raise DataFormatError(path, f"field {field!r} is an empty list of messages", line)
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(
                path, f"{where} must be an object with 'role' and 'content', got {type(message).__name__}", line
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataFormatError(path, f"{where} has no {key!r}; the message has {sorted(message)}", line)
            if not isinstance(message[key], str):
                raise DataFormatError(
                    path, f"{where}.{key} must be a string, got {type(message[key]).__name__}", line
                )
        if message["role"] not in ROLES:
            raise DataFormatError(
                path, f"{where}.role is {message['role']!r}; use one of {', '.join(ROLES)}", line
            )
        messages.append(dict(message))
    return messages


def read_conversation_field(record: dict, key: str, default_role: str, path: str, line: int) -> List[Message]:
    """``record[key]`` as messages: a message list, or a plain string taken as one ``default_role`` message."""
    if key not in record:
        raise DataFormatError(path, f"missing field {key!r}; the record has {sorted(record)}", line)
    value = record[key]
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return read_messages(value, path, line, key)


def _prefix_chars(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool, full: str,
                  path: str, line: int) -> int:
    """Length of ``messages`` rendered, checked to be a prefix of the full rendering ``full``."""
    text = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    if not full.startswith(text):
        raise DataFormatError(
            path, f"the chat template of {tokenizer.name} does not render the first {len(messages)} message(s) "
            "as a prefix of the whole conversation, so the assistant turns cannot be located "
            f"(use a template that does not rewrite earlier turns, or set {CHAT_TEMPLATE_KEY}=false)", line,
        )
    return len(text)


def _first_token_at(offsets: Sequence[Tuple[int, int]], char: int) -> int:
    """Index of the first token starting at or after character ``char`` (len(offsets) if none)."""
    return next((i for i, (start, _) in enumerate(offsets) if start >= char), len(offsets))


def _check_starts_before_assistant(messages: Sequence[Message], path: str, line: int, field: str) -> None:
    if messages[0]["role"] == "assistant":
        raise DataFormatError(
            path, f"{field}[0] is an assistant turn; a conversation starts with a system or user message", line
        )


def render_with_assistant_mask(
    tokenizer: Tokenizer, messages: Sequence[Message], path: str, line: int, field: str = "messages"
) -> Tuple[List[int], List[bool]]:
    """Token ids of the conversation and a mask that is True on every assistant turn.

    A turn's mask covers its content and the end-of-turn token the template emits after it
    (the model must learn to stop); whitespace the template writes after that token (ChatML's
    ``"\\n"``) is not trained, because generation stops at the end-of-turn token. The
    generation prompt (``<|im_start|>assistant\\n``) belongs to the prompt, not the turn.
    """
    _check_starts_before_assistant(messages, path, line, field)
    text = tokenizer.render_chat(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        first = _first_token_at(offsets, _prefix_chars(tokenizer, messages[:i], True, text, path, line))
        end = _first_token_at(offsets, _prefix_chars(tokenizer, messages[: i + 1], False, text, path, line))
        while end > first and not text[offsets[end - 1][0]:offsets[end - 1][1]].strip():
            end -= 1
        if end == first:
            raise DataFormatError(path, f"{field}[{i}] (assistant) renders to no tokens", line)
        mask[first:end] = [True] * (end - first)
    return ids, mask


def render_completion(
    tokenizer: Tokenizer, messages: Sequence[Message], path: str, line: int, field: str
) -> Tuple[List[int], int]:
    """Token ids of a conversation ending in an assistant answer, and the prompt length.

    The prompt is everything before the last message, with the generation prompt; the
    completion (positions ``>= prompt_len``) is the last assistant turn as the template
    renders it, to the end of the text.
    """
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            path, f"{field}: the last message must be the assistant's answer, got role {messages[-1]['role']!r}", line
        )
    if len(messages) < 2:
        raise DataFormatError(
            path, f"{field}: no prompt before the assistant's answer; give a 'prompt' field or make "
            "'chosen' and 'rejected' whole conversations", line,
        )
    _check_starts_before_assistant(messages, path, line, field)
    text = tokenizer.render_chat(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    prompt_len = _first_token_at(offsets, _prefix_chars(tokenizer, messages[:-1], True, text, path, line))
    return ids, prompt_len


def render_generation_prompt(
    tokenizer: Tokenizer, messages: Sequence[Message], path: str, line: int, field: str
) -> List[int]:
    """Token ids of a prompt for generation, ending with the template's generation prompt."""
    if messages[-1]["role"] == "assistant":
        raise DataFormatError(
            path, f"{field}: the last message is an assistant turn; a prompt for generation ends before the "
            "assistant's answer", line,
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def check_no_prompt_template(prompt_template: Optional[str], apply_chat_template: bool) -> None:
    if apply_chat_template and prompt_template is not None:
        raise ValueError(
            f"model.data.prompt_template={prompt_template!r} and {CHAT_TEMPLATE_KEY}=true both format the prompt; "
            "set model.data.prompt_template=null to use the chat template"
        )
