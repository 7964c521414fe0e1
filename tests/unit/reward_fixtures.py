"""Reward functions for tests/unit/test_reward_functions.py, loaded by import path
(``tests.unit.reward_fixtures:<name>``) in the reward worker processes."""
import math
import os
import re
import time


def answer_plus_length(prompts, responses, answer):
    """Declares only some fields: the worker must not pass it the others."""
    return [float(a) + len(r) for r, a in zip(responses, answer)]


def count_kwargs(**kwargs):
    """Takes **kwargs, so gets every field: 100 * (number of keywords) + position."""
    names = sorted(kwargs)
    assert names == ["answer", "difficulty", "prompts", "responses"], names
    return [100.0 * len(names) + i for i in range(len(kwargs["responses"]))]


def ones(prompts, responses, **_):
    return [1.0] * len(responses)


def none_for_odd(prompts, responses, **_):
    return [None if i % 2 else 2.0 for i in range(len(responses))]


def noisy(prompts, responses, **_):
    print("this print must not corrupt the protocol")
    return [3.0] * len(responses)


def raises(prompts, responses, **_):
    raise RuntimeError("boom from the reward function")


def nan_for_first(prompts, responses, **_):
    return [math.nan] + [1.0] * (len(responses) - 1)


def wrong_length(prompts, responses, **_):
    return [1.0]


def not_numbers(prompts, responses, **_):
    return "1.0"


def sleeps(prompts, responses, **_):
    time.sleep(1000)


def busy_loop(prompts, responses, **_):
    while True:
        pass


def regex_backtracking(prompts, responses, **_):
    # catastrophic backtracking: C code that holds the GIL for a very long time
    re.match(r"(a+)+$", "a" * 64 + "b")
    return [0.0] * len(responses)


def exits(prompts, responses, **_):
    os._exit(3)


NOT_A_FUNCTION = 42
