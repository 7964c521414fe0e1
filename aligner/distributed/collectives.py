"""The collectives trainers and servers share, written once: split a batch's rows over ranks,
gather rows back, broadcast from a tensor-parallel group's source rank, and a mean over the
data-parallel group.

Conventions:

* Rows are dim 0 of every tensor. Any dtype travels (bool, bfloat16, ...): tensors that gloo
  cannot reduce or gather natively are sent as their raw bytes.
* Every function is a no-op (returns its input) when ``torch.distributed`` is not initialised
  or the group has one rank, so single-process code calls them unconditionally.
* ``group=None`` for the gather and mean functions means megatron's data-parallel group (the
  world when megatron's parallel state is not initialised). Small bookkeeping tensors are put
  on the device the group's backend needs (CUDA for NCCL, CPU for gloo).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Groups and devices
# --------------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _megatron_parallel_state():
    """megatron's parallel_state if its groups exist, else None."""
    from megatron.core import parallel_state

    return parallel_state if parallel_state.model_parallel_is_initialized() else None


def data_parallel_group() -> Optional[dist.ProcessGroup]:
    """megatron's data-parallel group, or None (the default group) without megatron's state."""
    parallel_state = _megatron_parallel_state()
    return parallel_state.get_data_parallel_group() if parallel_state is not None else None


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group`` (the world for None); 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if _initialized() else 1


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where tensors for a collective over ``group`` must live: the current CUDA device for
    NCCL, the CPU otherwise."""
    if _initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a tensor's (contiguous) storage, 0-d and bool included."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------------------------
# Rows: split and gather
# --------------------------------------------------------------------------------------------


def split_rows(tensors: Mapping[str, torch.Tensor], rank: int, world: int) -> tuple[Tensors, int]:
    """This rank's rows of a batch, padded so every rank gets the same count.

    Every tensor's dim 0 is the batch ``B``. Each rank gets ``ceil(B / world)`` rows
    (rank-major); rows past ``B`` repeat row ``B - 1``, so padded rows are valid inputs
    (lengths >= 1) and collectives see equal shapes.

    Args:
        tensors: name -> ``[B, ...]``.
        rank, world: this rank and the number of ranks sharing the batch.
    Returns:
        ``(share, real)``: name -> ``[ceil(B / world), ...]``, and how many of those rows are
        real (the rest are padding).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    batch = _batch_size(tensors)
    per_rank = -(-batch // world)
    start = rank * per_rank
    real = max(0, min(per_rank, batch - start))
    rows = torch.arange(start, start + per_rank).clamp(max=batch - 1)
    return {name: tensor.index_select(0, rows.to(tensor.device)) for name, tensor in tensors.items()}, real


def gather_rows(
    share: Mapping[str, torch.Tensor], batch_size: int, group: Optional[dist.ProcessGroup] = None
) -> Tensors:
    """Inverse of ``split_rows``: all-gather every rank's share and drop the padding rows.

    Shares must have equal shapes on all ranks (``split_rows`` guarantees it). Sent as bytes
    so any dtype works on gloo.

    Args:
        share: name -> ``[ceil(B / world), ...]``, this rank's share.
        batch_size: ``B``.
        group: the group the batch was split over (None: the default group).
    Returns:
        name -> ``[B, ...]``, the full tensors, on every rank.
    """
    world = dist.get_world_size(group)
    out: Tensors = {}
    for name in sorted(share):  # same order on every rank
        tensor = share[name].contiguous()
        raw = as_bytes(tensor)
        pieces = [torch.empty_like(raw) for _ in range(world)]
        dist.all_gather(pieces, raw, group=group)
        full = torch.cat([p.view(tensor.dtype).reshape(tensor.shape) for p in pieces], dim=0)
        out[name] = full[:batch_size]
    return out


def all_gather_rows(
    tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None, pad_value: float = 0
) -> torch.Tensor:
    """Concatenate every rank's rows, in rank order, over ``group``.

    Ranks may hold different numbers of rows and, for tensors of 2 or more dims, different
    widths (dim 1, e.g. sequence lengths): narrower tensors are padded on the right with
    ``pad_value`` to the widest. Other dims must agree.

    Args:
        tensor: ``[N_rank, ...]`` or ``[N_rank, W_rank, ...]``.
        group: default: megatron's data-parallel group.
        pad_value: fill for the padded columns.
    Returns:
        ``[sum of N_rank, max W_rank, ...]`` on every rank; ``tensor`` itself on one rank.
    """
    if group is None:
        group = data_parallel_group() if _initialized() else None
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.dim() == 0:
        raise ValueError("all_gather_rows needs tensors with a row dimension (dim 0); got a 0-d tensor")
    device = collective_device(group)
    width = tensor.shape[1] if tensor.dim() >= 2 else 0
    shape = torch.tensor([tensor.shape[0], width], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    rows = [int(s[0]) for s in shapes]
    max_rows, max_width = max(rows), max(int(s[1]) for s in shapes)

    padded = tensor
    if tensor.dim() >= 2 and width < max_width:
        fill = torch.full((tensor.shape[0], max_width - width, *tensor.shape[2:]), pad_value,
                          dtype=tensor.dtype, device=tensor.device)
        padded = torch.cat([tensor, fill], dim=1)
    if padded.shape[0] < max_rows:
        filler = torch.zeros((max_rows - padded.shape[0], *padded.shape[1:]), dtype=padded.dtype,
                             device=padded.device)
        padded = torch.cat([padded, filler], dim=0)
    raw = as_bytes(padded).to(device)
    pieces = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(pieces, raw, group=group)
    parts = [p.view(padded.dtype).reshape(padded.shape)[:n] for p, n in zip(pieces, rows)]
    return torch.cat(parts).to(tensor.device)


def _batch_size(tensors: Mapping[str, torch.Tensor]) -> int:
    sizes = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            raise ValueError(f"tensor {name!r} is 0-d; every tensor to split needs a batch dim 0")
        sizes[name] = tensor.shape[0]
    if not sizes:
        raise ValueError("nothing to split: no tensors")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"tensors disagree on the batch size (dim 0): {sizes}")
    batch = next(iter(sizes.values()))
    if batch == 0:
        raise ValueError("cannot split an empty batch (B = 0)")
    return batch


# --------------------------------------------------------------------------------------------
# Broadcast from a source rank
# --------------------------------------------------------------------------------------------


def broadcast_from(
    tensor: Optional[torch.Tensor],
    src: int,
    group: Optional[dist.ProcessGroup] = None,
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Optional[torch.Tensor]:
    """Every rank of ``group`` ends with the source rank's tensor.

    The source passes its tensor; the others pass either a tensor of the same shape and dtype
    (filled in place) or None with ``shape`` and ``dtype`` (a new tensor is allocated on
    ``device``, default the collective's device).

    Args:
        tensor: the source's data, or a receive buffer, or None.
        src: *global* rank of the source (as ``torch.distributed.broadcast`` takes it).
        group: None for the default group.
    Returns:
        the tensor now holding the source's data (made contiguous first: a non-contiguous input
        is copied, not filled). On one rank, ``tensor`` unchanged.
    """
    if group_size(group) == 1:
        return tensor
    if tensor is None:
        if shape is None or dtype is None:
            raise ValueError("broadcast_from on a receiving rank without a tensor needs shape and dtype")
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device or collective_device(group))
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src, group=group)
    return tensor


def broadcast_tensor_parallel(
    tensor: Optional[torch.Tensor],
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Optional[torch.Tensor]:
    """Every rank of this rank's tensor-parallel group takes the group's source rank's tensor
    (megatron's ``get_tensor_model_parallel_src_rank``): the rank that talked to a server, or
    whose sample must be the one every TP rank continues with.

    Non-source ranks pass a buffer, or None with ``shape`` and ``dtype``; see ``broadcast_from``.
    Without torch.distributed, without megatron's parallel state or with TP = 1, returns
    ``tensor`` unchanged.
    """
    if not _initialized():
        return tensor
    parallel_state = _megatron_parallel_state()
    if parallel_state is None or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    return broadcast_from(tensor, parallel_state.get_tensor_model_parallel_src_rank(),
                          parallel_state.get_tensor_model_parallel_group(), shape, dtype, device)


# --------------------------------------------------------------------------------------------
# Means
# --------------------------------------------------------------------------------------------


def weighted_mean_over_ranks(value: float, count: float, group: Optional[dist.ProcessGroup] = None) -> float:
    """``sum(value_r * count_r) / sum(count_r)`` over the ranks of ``group`` (default:
    megatron's data-parallel group): the exact mean of a quantity each rank averaged over
    ``count_r`` items. NaN when no rank has any item.
    """
    if group is None and _initialized():
        group = data_parallel_group()
    pair = torch.tensor([value * count, count], dtype=torch.float64)
    if group_size(group) > 1:
        device = collective_device(group)
        pair = pair.to(device)
        dist.all_reduce(pair, group=group)
        pair = pair.cpu()
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")


def max_over_world(value: float) -> float:
    """The largest ``value`` over every rank of the job (NaN wins): a decision all ranks share."""
    tensor = torch.tensor([value], dtype=torch.float64)
    if _initialized() and dist.get_world_size() > 1:
        tensor = tensor.to(collective_device())
        tensor = torch.where(torch.isnan(tensor), torch.full_like(tensor, float("inf")), tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        tensor = tensor.cpu()
    return float(tensor[0])
