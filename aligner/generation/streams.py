"""Per-row random streams that do not depend on how rows are batched.

A rollout's samples must not change when the same global batch is split differently (DP=1 vs
DP=2, micro-batch 4 vs 8, TP=1 vs TP=2): a parallel run is then checkable against one process,
and a resumed or re-laid-out run draws what the original would have. A stateful generator per
micro-batch cannot give that (a row's draws depend on which rows came before it), so each row
carries a 62-bit key (``stream_key`` of e.g. seed, step, global prompt index, sample index) and
its t-th generated token uses ``counter_uniform(key, t)``: a pure function, the same on every
device and in every batch.

The hash is 32-bit arithmetic inside int64 tensors (products stay below 2**63 on every backend),
built from Wellons' ``lowbias32`` mixer, and is statistically checked in
tests/unit/test_generation_streams.py (uniformity and independence across keys and counters).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_key(*parts: int) -> int:
    """A 62-bit key (fits int64) from integers, order-sensitive: stream_key(a, b) != stream_key(b, a)."""
    key = 0
    for part in parts:
        key = _splitmix64(key ^ (int(part) & _MASK64))
    return key >> 2


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), in two 16-bit halves so no product overflows int64."""
    high = ((x >> 16) * constant) & _MASK32
    return ((high << 16) + (x & 0xFFFF) * constant) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """keys [B] int64 (from ``stream_key``), counters [B] int64 >= 0 -> [B] float64 uniforms in [0, 1).

    Distinct (key, counter) pairs give independent-looking draws; equal pairs give equal draws.
    """
    keys = keys.to(torch.int64)
    counters = counters.to(torch.int64) & _MASK32
    low, high = keys & _MASK32, (keys >> 32) & _MASK32
    first = _mix32(low ^ _mix32(high ^ _mix32(counters ^ 0x9E3779B9)))
    second = _mix32(first ^ _mix32(low ^ 0x85EBCA6B))
    # 53 bits: 32 from the first word, 21 from the second (the float64 mantissa)
    return ((first << 21) + (second >> 11)).double() / float(2 ** 53)
