"""Rank-0 front / follower ranks over gloo with 2 real processes.

Both ranks build the expected command stream from the same seeds (``_commands``); rank 0 sends
it, rank 1 receives it in follower_loop and compares bit for bit. Rank 1 reports what it saw
through a JSON file, and any assertion error in a child fails the spawn.
"""

import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aligner.serving.followers import (
    Command,
    CommandBroadcaster,
    follower_loop,
    gather_from_ranks,
    recv_command,
    send_command,
    split_for_rank,
)

pytestmark = pytest.mark.timeout(120)


def _tensor(dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=gen).to(dtype)


def _commands():
    """(command, tensors, metadata) in send order. Odd sizes test unaligned byte offsets."""
    return [
        (
            Command.INFER,
            {
                "tokens": _tensor(torch.int64, (3, 7), 1),
                "lengths": _tensor(torch.int64, (3,), 2),
                "flags": _tensor(torch.bool, (5,), 3),  # 5 bytes: next tensor starts unaligned
                "half": _tensor(torch.float16, (2, 3), 4),
                "bf16": _tensor(torch.bfloat16, (4,), 5),
                "scalar": _tensor(torch.float64, (), 6),
                "empty": torch.zeros(0, 3),
                "bytes": _tensor(torch.uint8, (3,), 7),
                "i32": _tensor(torch.int32, (2, 2, 2), 8),
                "i8": _tensor(torch.int8, (3,), 9),
                "i16": _tensor(torch.int16, (1,), 10),
            },
            {},
        ),
        (
            Command.TRAIN,
            {"returns": _tensor(torch.float32, (2, 4), 11), "mask": _tensor(torch.float32, (2, 4), 12)},
            {"step": "3", "note": "ünïcode"},
        ),
        (Command.SAVE, {}, {"step": "4", "path": "/ckpt/step4"}),
        (Command.INFER, {"tokens": _tensor(torch.int64, (1, 1), 13)}, {}),
    ]


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        group = dist.new_group([0, 1])
        expected = _commands()
        if rank == 0:
            broadcaster = CommandBroadcaster(group)
            for command, tensors, metadata in expected:
                broadcaster.send(command, tensors, metadata)
            broadcaster.stop()
            # The bare primitives carry a command just the same.
            send_command(Command.SAVE, None, {"step": "9"}, group=group)
        else:
            received = []

            def record(command):
                return lambda tensors, metadata: received.append((command, tensors, metadata))

            handled = follower_loop({c: record(c) for c in (Command.INFER, Command.TRAIN, Command.SAVE)}, group)
            assert handled == len(expected)
            for (cmd, tensors, metadata), (want_cmd, want_tensors, want_metadata) in zip(received, expected):
                assert cmd == want_cmd and metadata == want_metadata
                assert list(tensors) == list(want_tensors)
                for name, want in want_tensors.items():
                    got = tensors[name]
                    assert got.dtype == want.dtype and got.shape == want.shape, name
                    # Bitwise comparison: equal bytes, so -0.0 / NaN payloads would count too.
                    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
            command, tensors, metadata = recv_command(group=group)
            assert (command, tensors, metadata) == (Command.SAVE, {}, {"step": "9"})
            with open(os.path.join(out_dir, "follower.json"), "w") as f:
                json.dump({"handled": handled, "names": [sorted(t) for _, t, _ in received]}, f)

        # Data-parallel share and gather with an uneven batch (B=5 over 2 ranks).
        full = {
            "tokens": torch.arange(20, dtype=torch.int64).view(5, 4),
            "mask": (torch.arange(20).view(5, 4) % 3 == 0),
            "values": torch.linspace(-1, 1, 10, dtype=torch.bfloat16).view(5, 2),
        }
        share, real = split_for_rank(full, rank, world)
        assert real == (3 if rank == 0 else 2)
        assert all(t.shape[0] == 3 for t in share.values())
        doubled = {"tokens": share["tokens"] * 2, "mask": share["mask"], "values": share["values"]}
        gathered = gather_from_ranks(doubled, batch_size=5, group=group)
        assert torch.equal(gathered["tokens"], full["tokens"] * 2)
        assert torch.equal(gathered["mask"], full["mask"])
        assert torch.equal(gathered["values"], full["values"])
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_commands_reach_the_follower_exactly_and_stop_ends_the_loop(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    report = json.loads((tmp_path / "follower.json").read_text())
    assert report["handled"] == 4
    assert report["names"][2] == []  # SAVE carries metadata only
    assert report["names"][1] == ["mask", "returns"]


def test_split_for_rank_pads_with_the_last_row():
    batch = {"x": torch.tensor([[10], [11], [12], [13], [14]]), "n": torch.tensor([1, 2, 3, 4, 5])}
    shares = [split_for_rank(batch, r, 3) for r in range(3)]
    # Hand-worked: ceil(5/3)=2 rows each; rank 2 gets row 4 and a copy of row 4.
    assert [s[1] for s in shares] == [2, 2, 1]
    assert [s[0]["x"].flatten().tolist() for s in shares] == [[10, 11], [12, 13], [14, 14]]
    assert shares[2][0]["n"].tolist() == [5, 5]
    share, real = split_for_rank({"x": torch.tensor([[7]])}, 3, 4)
    assert real == 0 and share["x"].tolist() == [[7]]
    with pytest.raises(ValueError, match="'s'"):
        split_for_rank({"s": torch.tensor(1.0)}, 0, 2)
    with pytest.raises(ValueError, match="batch size"):
        split_for_rank({"a": torch.zeros(2), "b": torch.zeros(3)}, 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        split_for_rank(batch, 2, 2)
