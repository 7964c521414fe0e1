"""What to do with samples longer than the model's sequence length, and prompt templates.

Shared by the SFT, comparison and prompt datasets so that ``model.data.truncation`` and
``model.data.prompt_template`` mean the same thing everywhere.
"""
from __future__ import annotations

import logging
import string
from typing import List, Optional, Sequence

logger = logging.getLogger("aligner.data")

TRUNCATION_MODES = ("truncate", "drop")


def check_max_seq_length(value, config_key: str = "model.encoder_seq_length") -> int:
    if int(value) < 2:
        raise ValueError(f"{config_key}={value} must be at least 2")
    return int(value)


def check_truncation_mode(mode: str, config_key: str = "model.data.truncation") -> str:
    """Return ``mode`` if valid, else raise ValueError naming the config key to fix."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"{config_key}={mode!r} is not valid; use one of {', '.join(TRUNCATION_MODES)}")
    return mode


def check_prompt_template(template: Optional[str], config_key: str = "model.data.prompt_template") -> Optional[str]:
    """Validate a ``str.format`` template with a single ``{prompt}`` field (None = no template).

    Literal braces must be doubled (``{{`` / ``}}``) as usual for ``str.format``.
    """
    if template is None:
        return None
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(
            f"{config_key}={template!r} is not a valid format string ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    if fields != {"prompt"}:
        raise ValueError(
            f"{config_key}={template!r} must use the placeholder {{prompt}} and no other; found "
            f"{sorted(fields) or 'none'} (write literal braces as {{{{ and }}}})"
        )
    return template


def apply_prompt_template(template: Optional[str], prompt: str) -> str:
    return prompt if template is None else template.format(prompt=prompt)


def fit_answer(prompt_len: int, answer: Sequence[int], max_length: int) -> Optional[List[int]]:
    """Cut ``answer`` so that ``prompt_len + len(answer) <= max_length``.

    Returns the (possibly shortened) answer, or None when not even one answer token fits —
    a sample with no answer tokens contributes nothing to any loss, so it is dropped.
    """
    room = max_length - prompt_len
    if room < 1:
        return None
    return list(answer[:room])


def log_length_filtering(
    path: str, total: int, num_truncated: int, num_dropped: int, max_length: int, mode: str, what: str = "samples",
    config_key: str = "model.data.truncation",
) -> None:
    """Log once per dataset how many samples did not fit; silent when all fit."""
    if num_truncated or num_dropped:
        logger.warning(
            "%s: %d of %d %s exceed %d tokens: %d truncated, %d dropped (%s=%s)",
            path, num_truncated + num_dropped, total, what, max_length, num_truncated, num_dropped, config_key, mode,
        )
