"""Rank-0 front, follower ranks: how one HTTP request reaches every rank of the critic job.

Only rank 0 of the critic job runs the HTTP server. For each request it broadcasts a command
(INFER / TRAIN / SAVE, or STOP at shutdown) with the request's tensors to all ranks of a
process group; ranks > 0 sit in :func:`follower_loop`, receive the same command in the same
order, and run their share of the work (tensor-parallel halves, data-parallel rows). Because
rank 0's server executes one request at a time (server.py), all ranks see one command stream.

Wire format over torch.distributed (works with gloo; for NCCL pass a CUDA ``device``), no
pickle: a fixed int64 preamble ``[magic, command, n_tensors, spec_len, text_len, data_len]``,
then an int64 spec ``(dtype code, ndim, *shape)`` per tensor, then a uint8 UTF-8 JSON text
``{"names": [...], "metadata": {...}}``, then every tensor's bytes concatenated into one uint8
buffer. Sending raw bytes keeps every dtype (bool, bfloat16) working on every backend and
costs one collective for all the data. Empty parts are skipped on both sides alike because
both know the lengths from the preamble.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from aligner.distributed.collectives import as_bytes, gather_rows, split_rows

_MAGIC = 0x414C4E52  # "ALNR": catches ranks that fell out of step with the command stream
_PREAMBLE_LEN = 6

# Codes are part of the wire format: append, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.bool: 9,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class Command(enum.IntEnum):
    INFER = 1
    TRAIN = 2
    SAVE = 3
    STOP = 4
    RESTORE = 5


Tensors = dict[str, torch.Tensor]
Metadata = dict[str, str]


def _group_src(group: dist.ProcessGroup | None) -> int:
    """Global rank of the group's rank 0 (broadcast takes global ranks)."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def send_command(
    command: Command,
    tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Broadcast one command from rank 0 of ``group`` (call it on that rank only)."""
    if dist.get_rank(group) != 0:
        raise RuntimeError(
            f"send_command must run on rank 0 of the group; this is rank {dist.get_rank(group)}"
        )
    tensors = dict(tensors or {})
    names = list(tensors)
    spec: list[int] = []
    data_parts = []
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which followers cannot receive")
        spec += [_DTYPE_CODES[tensor.dtype], tensor.dim(), *tensor.shape]
        data_parts.append(as_bytes(tensor.detach().to("cpu")))
    text = json.dumps({"names": names, "metadata": dict(metadata or {})}).encode("utf-8")
    data = torch.cat(data_parts) if data_parts else torch.empty(0, dtype=torch.uint8)

    src = _group_src(group)
    preamble = torch.tensor(
        [_MAGIC, int(command), len(names), len(spec), len(text), data.numel()],
        dtype=torch.int64,
        device=device,
    )
    dist.broadcast(preamble, src=src, group=group)
    if spec:
        dist.broadcast(torch.tensor(spec, dtype=torch.int64, device=device), src=src, group=group)
    if text:
        text_t = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
        dist.broadcast(text_t, src=src, group=group)
    if data.numel():
        dist.broadcast(data.to(device), src=src, group=group)


def recv_command(
    *, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> tuple[Command, Tensors, Metadata]:
    """Receive one command broadcast by rank 0 of ``group`` (call on ranks > 0).

    Tensors come back on ``device`` with the sender's names, dtypes and shapes.
    """
    src = _group_src(group)
    preamble = torch.empty(_PREAMBLE_LEN, dtype=torch.int64, device=device)
    dist.broadcast(preamble, src=src, group=group)
    magic, code, n_tensors, spec_len, text_len, data_len = (int(v) for v in preamble.tolist())
    if magic != _MAGIC:
        raise RuntimeError(
            f"follower received a malformed command preamble {preamble.tolist()}: ranks are out "
            "of step (every rank of the group must call recv_command / follower_loop)"
        )
    command = Command(code)
    spec = torch.empty(spec_len, dtype=torch.int64, device=device)
    if spec_len:
        dist.broadcast(spec, src=src, group=group)
    text = torch.empty(text_len, dtype=torch.uint8, device=device)
    if text_len:
        dist.broadcast(text, src=src, group=group)
    data = torch.empty(data_len, dtype=torch.uint8, device=device)
    if data_len:
        dist.broadcast(data, src=src, group=group)

    header = json.loads(bytes(text.cpu().tolist()).decode("utf-8")) if text_len else {}
    names = header.get("names", [])
    metadata = header.get("metadata", {})
    if len(names) != n_tensors:
        raise RuntimeError(f"command header lists {len(names)} names for {n_tensors} tensors")
    spec_values = spec.tolist()
    tensors: Tensors = {}
    pos = offset = 0
    for name in names:
        dtype = _CODE_DTYPES[spec_values[pos]]
        ndim = spec_values[pos + 1]
        shape = spec_values[pos + 2 : pos + 2 + ndim]
        pos += 2 + ndim
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        chunk = data[offset : offset + nbytes]
        offset += nbytes
        # clone before view: a view to a wider dtype needs an aligned offset, and each tensor
        # should own its memory rather than pin the whole receive buffer
        tensors[name] = chunk.clone().view(dtype).reshape(shape)
    return command, tensors, metadata


class CommandBroadcaster:
    """Rank 0's side of the command stream: call one method per request, in order."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        self.group = group
        self.device = device

    def send(
        self,
        command: Command,
        tensors: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        send_command(command, tensors, metadata, group=self.group, device=self.device)

    def infer(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.send(Command.INFER, tensors)

    def train(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.send(Command.TRAIN, tensors)

    def save(self, metadata: Mapping[str, str]) -> None:
        self.send(Command.SAVE, None, metadata)

    def stop(self) -> None:
        self.send(Command.STOP)


FollowerFn = Callable[[Tensors, Metadata], Any]


def follower_loop(
    handlers: Mapping[Command, FollowerFn],
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """Run on ranks > 0: receive commands until STOP, calling ``handlers[command](tensors,
    metadata)`` for each. Returns how many commands (excluding STOP) were handled.

    A missing handler or a handler exception is raised: the ranks are then out of step, and
    failing loudly lets the launcher tear the job down instead of hanging in a collective.
    """
    handled = 0
    while True:
        command, tensors, metadata = recv_command(group=group, device=device)
        if command == Command.STOP:
            return handled
        fn = handlers.get(command)
        if fn is None:
            raise RuntimeError(
                f"follower has no handler for {command.name}; handlers given: "
                f"{sorted(c.name for c in handlers)}"
            )
        fn(tensors, metadata)
        handled += 1


# Data-parallel shares: the critic job's names for the shared row collectives.
split_for_rank = split_rows
gather_from_ranks = gather_rows
