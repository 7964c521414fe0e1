"""Exact-match reward for the built-in arithmetic task (``aligner.data.prep.arithmetic``).

Config::

    reward:
      functions:
        - path: aligner.rollout.rewards.arithmetic:exact_match
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

_INTEGER = re.compile(r"-?\d+")


def first_integer(text: str) -> Optional[int]:
    """The first integer written in ``text`` (an optional minus sign, then digits), or None.

    ``" 85<eos>"`` -> 85, ``"-12 apples"`` -> -12, ``"x=4, y=5"`` -> 4, ``"none"`` -> None.
    """
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def exact_match(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[object], **_) -> list[float]:
    """1.0 where the first integer of the response equals the row's ``answer``, else 0.0.

    Args:
        prompts: the problems, e.g. ``"37+48="`` (unused; part of the reward-function calling
            convention).
        responses: the generated texts.
        answer: the correct results (int, or a string holding one), aligned with ``responses``.
    Returns:
        one float per response. A response without any integer scores 0.0, not None: it is a
        wrong answer, not an unscorable one.
    """
    scores = []
    for response, expected in zip(responses, answer):
        got = first_integer(response)
        scores.append(1.0 if got is not None and got == int(str(expected).strip()) else 0.0)
    return scores


def last_integer(text: str) -> Optional[int]:
    """The last integer written in ``text``, or None: ``"37 + 48 = 85"`` -> 85."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def final_answer_match(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[object], **_) -> list[float]:
    """1.0 where the *last* integer of the response equals the row's ``answer``, else 0.0.

    For chat models that restate the problem before answering (``"37 + 48 = 85"``), where the
    first integer is an operand. A response that keeps talking after its answer is scored by
    the last number it wrote, so rambling is not free: stopping after the answer is learnt.
    """
    scores = []
    for response, expected in zip(responses, answer):
        got = last_integer(response)
        scores.append(1.0 if got is not None and got == int(str(expected).strip()) else 0.0)
    return scores
