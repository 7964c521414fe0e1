"""Tensor-parallel slicing of a full parameter, read from megatron's own parameter attributes.

megatron marks every split parameter with `tensor_model_parallel=True`, `partition_dim` (0 for
column-parallel layers and the vocabulary embedding, 1 for row-parallel layers) and
`partition_stride`. With stride s the full tensor is cut into s*world equal blocks along
partition_dim and rank r holds blocks r, r+world, ... concatenated (megatron's
`_initialize_affine_weight_cpu`). SwiGLU's fc1 has stride 2, which is how each rank ends up
with [gate_r; up_r] rather than a contiguous slice of [gate; up].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Partition:
    dim: int
    stride: int = 1


def partition_of(param: torch.Tensor) -> Partition | None:
    """The parameter's split, or None for a replicated parameter (norms, row-parallel biases)."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return Partition(int(param.partition_dim), int(getattr(param, "partition_stride", 1)))


def shard(full: torch.Tensor, part: Partition | None, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of `full`; the whole tensor when `part` is None or world is 1."""
    if part is None or world == 1:
        return full
    blocks = part.stride * world
    size = full.shape[part.dim]
    if size % blocks:
        raise ValueError(f"dimension {part.dim} of size {size} does not split into {blocks} equal blocks")
    pieces = full.split(size // blocks, dim=part.dim)
    return torch.cat(pieces[rank::world], dim=part.dim)


def unshard(shards: list[torch.Tensor], part: Partition | None) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's piece, in rank order."""
    if part is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(part.stride, dim=part.dim) for s in shards]
    ordered = [per_rank[r][j] for j in range(part.stride) for r in range(len(shards))]
    return torch.cat(ordered, dim=part.dim)
