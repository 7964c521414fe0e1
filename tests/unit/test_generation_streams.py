"""Counter-based per-row random streams (aligner.generation.streams).

Checked against a plain-Python re-implementation of the hash (unbounded ints, no 16-bit
splitting), and statistically: uniform on [0, 1) and uncorrelated across neighbouring keys and
counters. Everything is deterministic, so the statistical bounds cannot flake.
"""
import math

import torch

from aligner.generation.streams import counter_uniform, stream_key

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def reference_uniform(key: int, counter: int) -> float:
    low, high = key & M32, (key >> 32) & M32
    first = lowbias32(low ^ lowbias32(high ^ lowbias32((counter & M32) ^ 0x9E3779B9)))
    second = lowbias32(first ^ lowbias32(low ^ 0x85EBCA6B))
    return ((first << 21) + (second >> 11)) / 2 ** 53


def test_equals_a_plain_integer_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    keys = [stream_key(7, i) for i in range(200)] + [0, 1, 2 ** 62 - 1, 2 ** 32, 2 ** 32 - 1]
    counters = torch.randint(0, 2 ** 31, (len(keys),), generator=gen).tolist()
    counters[:4] = [0, 1, 2 ** 32 - 1, 255]
    got = counter_uniform(torch.tensor(keys), torch.tensor(counters))
    assert got.dtype == torch.float64
    want = torch.tensor([reference_uniform(k, c) for k, c in zip(keys, counters)], dtype=torch.float64)
    assert torch.equal(got, want)


def test_stream_keys_fit_int64_and_depend_on_every_part_and_its_order():
    keys = {stream_key(1, step, prompt, sample) for step in range(5) for prompt in range(20) for sample in range(4)}
    assert len(keys) == 400
    assert all(0 <= k < 2 ** 62 for k in keys)
    assert stream_key(1, 2) != stream_key(2, 1)
    assert stream_key(1, 2) == stream_key(1, 2)
    assert stream_key(1) != stream_key(1, 0)


def _grid(keys: int, counters: int, family: int = 11) -> torch.Tensor:
    """[keys, counters] uniforms for consecutive stream keys and counters 0..counters-1."""
    k = torch.tensor([stream_key(family, i) for i in range(keys)]).repeat_interleave(counters)
    c = torch.arange(counters).repeat(keys)
    return counter_uniform(k, c).reshape(keys, counters)


def test_draws_are_uniform_on_the_unit_interval():
    u = _grid(400, 500).flatten()
    n = u.numel()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Kolmogorov-Smirnov distance against U(0,1): 1.95/sqrt(n) is the 0.1% critical value
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - s, s - (i - 1) / n).max())
    assert ks < 1.95 / math.sqrt(n), ks
    # chi-square over 100 bins (99 degrees of freedom) for 8 families of streams: each below the
    # 0.01% critical value (160.2), and their mean within 3 standard errors of 99 (sd 14.07/sqrt(8))
    chi2 = []
    for family in range(8):
        v = u if family == 0 else _grid(400, 500, family).flatten()
        counts = torch.bincount((v * 100).long(), minlength=100).double()
        chi2.append(float(((counts - n / 100) ** 2 / (n / 100)).sum()))
    assert max(chi2) < 160.2, chi2
    assert abs(sum(chi2) / len(chi2) - 99) < 3 * 14.07 / math.sqrt(len(chi2)), chi2


def test_neighbouring_counters_and_keys_are_uncorrelated():
    u = _grid(400, 500)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    bound = 4.0 / math.sqrt(u.numel())  # four standard errors of a null correlation
    assert abs(corr(u[:, 1:], u[:, :-1])) < bound   # t and t+1 in one stream
    assert abs(corr(u[1:, :], u[:-1, :])) < bound   # the same t in neighbouring streams
    # a row's draws do not repeat: every (key, counter) gives its own value
    assert u.flatten().unique().numel() == u.numel()
