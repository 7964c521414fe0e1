"""aligner.distributed.collectives over gloo with 2 real processes, and their single-process
no-op behaviour.

The 2-process worker runs two layouts in turn: TP=2 (the tensor-parallel broadcast; the
data-parallel group has one rank, so data-parallel gathers are no-ops) and DP=2 (gathers and
means over megatron's data-parallel group by default). Any assertion error in a child fails
the spawn.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aligner.distributed.collectives import (
    all_gather_rows,
    broadcast_from,
    broadcast_tensor_parallel,
    gather_rows,
    split_rows,
    weighted_mean_over_ranks,
)
from aligner.distributed.launch_env import free_port
from tests.launch import REPO, child_env

pytestmark = pytest.mark.timeout(180)


def _rank_tensor(rank, dtype):
    """Rank 0: 3 rows x width 2; rank 1: 1 row x width 4 (unequal rows and widths)."""
    rows, width = (3, 2) if rank == 0 else (1, 4)
    base = torch.arange(rows * width, dtype=torch.float32).view(rows, width) + 100 * rank
    return base.to(dtype) if dtype != torch.bool else (base.long() % 2 == 0)


def _check_gathers(rank, group):
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        pad = False if dtype == torch.bool else -1
        got = all_gather_rows(_rank_tensor(rank, dtype), group=group, pad_value=pad)
        a, b = _rank_tensor(0, dtype), _rank_tensor(1, dtype)
        want = torch.cat([torch.cat([a, torch.full((3, 2), pad, dtype=dtype)], dim=1), b])
        assert got.dtype == dtype and torch.equal(got, want), (dtype, got)
    # 1-D rows of different counts
    got = all_gather_rows(torch.full((rank + 1,), float(rank)), group=group)
    assert got.tolist() == [0.0, 1.0, 1.0]
    # 3-D: padded along dim 1 only
    got = all_gather_rows(torch.ones(1, 1 + rank, 2), group=group)
    assert got.shape == (2, 2, 2) and got[0, 1].tolist() == [0.0, 0.0]

    value, count = (1.0, 3.0) if rank == 0 else (4.0, 1.0)
    assert weighted_mean_over_ranks(value, count, group) == pytest.approx(1.75)
    assert math.isnan(weighted_mean_over_ranks(5.0, 0.0, group))

    full = {"x": torch.arange(10).view(5, 2), "m": torch.tensor([True, False, True, True, False])}
    share, real = split_rows(full, rank, 2)
    assert real == (3 if rank == 0 else 2)
    back = gather_rows(share, 5, group)
    assert all(torch.equal(back[k], full[k]) for k in full)


def _worker(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from aligner.distributed.setup import initialize, shutdown

    try:
        # -- TP=2: ranks 0 and 1 form one tensor-parallel group, source rank 0
        initialize(tensor_parallel=2)
        mine = torch.tensor([7, 8, 9]) if rank == 0 else None
        got = broadcast_tensor_parallel(mine, shape=(3,), dtype=torch.int64)
        assert got.tolist() == [7, 8, 9]
        buffer = torch.zeros(2, 2) if rank else torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        assert broadcast_tensor_parallel(buffer) is buffer and buffer.tolist() == [[1.0, 2.0], [3.0, 4.0]]
        # the data-parallel group has one rank here: gathers and means are the identity
        local = _rank_tensor(rank, torch.float32)
        assert all_gather_rows(local) is local
        assert weighted_mean_over_ranks(float(rank), 2.0) == float(rank)
        # an explicit group still works
        world_group = dist.new_group([0, 1])
        _check_gathers(rank, world_group)
        got = broadcast_from(torch.tensor([5.0]) if rank == 1 else None, src=1, group=world_group,
                             shape=(1,), dtype=torch.float32)
        assert got.tolist() == [5.0]

        # -- DP=2: the default group of the gathers and means is now megatron's data-parallel one
        initialize(tensor_parallel=1)
        _check_gathers(rank, None)
        token = torch.tensor([rank])
        assert broadcast_tensor_parallel(token) is token  # TP=1: no-op
    finally:
        shutdown()


def test_collectives_over_two_ranks():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


SINGLE_PROCESS = """
import math, torch, torch.distributed as dist
from aligner.distributed.collectives import (all_gather_rows, broadcast_from, broadcast_tensor_parallel,
                                             weighted_mean_over_ranks)
assert not dist.is_initialized()
t = torch.arange(6).view(2, 3)
assert all_gather_rows(t) is t
assert broadcast_tensor_parallel(t) is t
assert broadcast_from(t, src=0) is t
assert weighted_mean_over_ranks(2.5, 4) == 2.5
assert math.isnan(weighted_mean_over_ranks(2.5, 0))
print("ok")
"""


def test_single_process_no_ops():
    """Without torch.distributed every collective hands its input back. In a fresh process: a test
    run earlier in this one may have initialised a process group."""
    out = subprocess.run([sys.executable, "-c", SINGLE_PROCESS], capture_output=True, text=True, timeout=300,
                         env=child_env(), cwd=str(REPO))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_split_rows_errors():
    with pytest.raises(ValueError, match="rank 2"):
        split_rows({"x": torch.zeros(3)}, 2, 2)
    with pytest.raises(ValueError, match="disagree"):
        split_rows({"a": torch.zeros(2), "b": torch.zeros(3)}, 0, 2)
    with pytest.raises(ValueError, match="empty batch"):
        split_rows({"a": torch.zeros(0)}, 0, 2)
