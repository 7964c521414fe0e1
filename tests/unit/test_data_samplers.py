import itertools

import pytest

from aligner.data.samplers import DistributedResumableSampler


def take(sampler, n):
    """The next ``n`` batches, walking across epoch boundaries."""
    out = []
    while len(out) < n:
        out.extend(itertools.islice(iter(sampler), n - len(out)))
    return out


def test_epoch_is_a_permutation_without_repeats_and_drops_partial_batch():
    sampler = DistributedResumableSampler(10, 4, 0, 1, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert (sampler.epoch, sampler.consumed_samples) == (1, 0)
    # next epoch is a different shuffle
    assert list(sampler) != batches


def test_no_shuffle_keeps_order_and_keeps_partial_batch_when_asked():
    sampler = DistributedResumableSampler(5, 2, 0, 1, seed=0, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1], [2, 3], [4]]


def test_same_seed_same_order_different_seed_different_order():
    a = take(DistributedResumableSampler(50, 5, 0, 1, seed=1), 10)
    b = take(DistributedResumableSampler(50, 5, 0, 1, seed=1), 10)
    c = take(DistributedResumableSampler(50, 5, 0, 1, seed=2), 10)
    assert a == b and a != c


@pytest.mark.parametrize("k", [0, 1, 3, 4, 5])  # 4 steps per epoch: covers mid-epoch and the boundary
def test_resume_after_k_steps_continues_identically(k):
    reference = take(DistributedResumableSampler(17, 4, 0, 1, seed=7), 12)
    first = DistributedResumableSampler(17, 4, 0, 1, seed=7)
    head = take(first, k)
    state = first.state_dict()
    resumed = DistributedResumableSampler(17, 4, 0, 1, seed=7)
    resumed.load_state_dict(state)
    assert head + take(resumed, 12 - k) == reference
    # the state the trainer can compute from its step count is the same state
    fresh = DistributedResumableSampler(17, 4, 0, 1, seed=7)
    computed = fresh.state_for_step(k)
    resumed2 = DistributedResumableSampler(17, 4, 0, 1, seed=7)
    resumed2.load_state_dict(computed)
    assert head + take(resumed2, 12 - k) == reference


def test_dp2_slices_concatenate_to_the_dp1_batch():
    dp1 = take(DistributedResumableSampler(23, 6, 0, 1, seed=5), 9)
    rank0 = take(DistributedResumableSampler(23, 6, 0, 2, seed=5), 9)
    rank1 = take(DistributedResumableSampler(23, 6, 1, 2, seed=5), 9)
    for full, a, b in zip(dp1, rank0, rank1):
        assert len(a) == len(b) == 3
        assert a + b == full
    dp3 = [take(DistributedResumableSampler(23, 6, r, 3, seed=5), 9) for r in range(3)]
    assert [x + y + z for x, y, z in zip(*dp3)] == dp1


def test_partial_last_batch_is_sliced_per_rank():
    ranks = [list(DistributedResumableSampler(5, 4, r, 2, seed=0, shuffle=False, drop_last=False)) for r in range(2)]
    assert ranks[0] == [[0, 1], [4]]
    assert ranks[1] == [[2, 3], []]


def test_invalid_configurations():
    with pytest.raises(ValueError, match="global_batch_size=5 must be a positive multiple"):
        DistributedResumableSampler(10, 5, 0, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        DistributedResumableSampler(10, 4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="fewer than model.global_batch_size=8"):
        DistributedResumableSampler(5, 8, 0, 1, seed=0)
