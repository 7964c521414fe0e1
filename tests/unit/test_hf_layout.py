"""Pure rearrangements of the HF bridge, on hand-worked examples: megatron's grouped QKV rows and
megatron's strided tensor-parallel split (SwiGLU fc1: each rank holds [gate_r; up_r])."""
import torch

from aligner.models.hf.layout import grouped_to_qkv, qkv_to_grouped
from aligner.models.hf.tp_shards import Partition, shard, unshard


def rows(*labels):
    """A [len(labels), 2] tensor whose row i is (labels[i], -labels[i]) so rows are traceable."""
    return torch.tensor([[float(x), -float(x)] for x in labels])


def test_qkv_grouping_gqa_by_hand():
    # 4 query heads, 2 KV groups, head_dim 1: q heads 10..13, k heads 20, 21, v heads 30, 31
    q, k, v = rows(10, 11, 12, 13), rows(20, 21), rows(30, 31)
    grouped = qkv_to_grouped(q, k, v, groups=2)
    # megatron: [q heads of group 0, k0, v0 | q heads of group 1, k1, v1]
    assert torch.equal(grouped, rows(10, 11, 20, 30, 12, 13, 21, 31))
    back = grouped_to_qkv(grouped, heads=4, groups=2)
    for got, want in zip(back, (q, k, v)):
        assert torch.equal(got, want)


def test_qkv_grouping_mha_head_dim_two_bias():
    # 2 heads (= groups), head_dim 2, 1-D (bias): q=[1,2 | 3,4], k=[5,6 | 7,8], v=[9,10 | 11,12]
    q, k, v = torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8]), torch.tensor([9.0, 10, 11, 12])
    grouped = qkv_to_grouped(q, k, v, groups=2)
    assert grouped.tolist() == [1, 2, 5, 6, 9, 10, 3, 4, 7, 8, 11, 12]
    assert [t.tolist() for t in grouped_to_qkv(grouped, heads=2, groups=2)] == [q.tolist(), k.tolist(), v.tolist()]


def test_strided_shard_gives_each_rank_its_gate_and_up():
    # fc1 = [gate rows g0..g3; up rows u0..u3] (gate 0-3, up 100-103), TP=2, stride 2
    full = rows(0, 1, 2, 3, 100, 101, 102, 103)
    part = Partition(dim=0, stride=2)
    assert torch.equal(shard(full, part, rank=0, world=2), rows(0, 1, 100, 101))
    assert torch.equal(shard(full, part, rank=1, world=2), rows(2, 3, 102, 103))
    pieces = [shard(full, part, r, 2) for r in range(2)]
    assert torch.equal(unshard(pieces, part), full)


def test_row_parallel_shard_on_dim_one():
    full = torch.arange(12.0).reshape(2, 6)
    part = Partition(dim=1)
    assert shard(full, part, rank=2, world=3).tolist() == [[4, 5], [10, 11]]
    assert torch.equal(unshard([shard(full, part, r, 3) for r in range(3)], part), full)


def test_replicated_and_world_of_one_untouched():
    full = torch.arange(4.0)
    assert shard(full, None, rank=1, world=2) is full
    assert shard(full, Partition(0, 2), rank=0, world=1) is full
