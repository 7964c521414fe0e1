"""Deterministic, resumable batch sampling for data-parallel training.

The order of samples is a function of ``(seed, epoch)`` only, and every rank computes the
same global batch and takes its own contiguous slice. Consequences the trainers rely on:

* the global batch at step ``k`` is the same for any data-parallel size, so DP=2 trains on
  exactly the samples DP=1 would (only the split across ranks differs);
* resuming needs only ``(epoch, consumed_samples)``: the next batch is recomputed, not
  replayed.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List

import torch

logger = logging.getLogger("aligner.data")


class DistributedResumableSampler:
    """Yields, per global step, this rank's list of dataset indices.

    Args:
        dataset_len: number of samples in the dataset.
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        dp_rank, dp_size: this rank and the number of data-parallel ranks; each rank gets
            ``global_batch_size // dp_size`` indices, rank ``r`` the ``r``-th contiguous slice.
        seed: epoch ``e`` is shuffled with a generator seeded ``seed + e``.
        shuffle: False keeps the file order (e.g. for validation).
        drop_last: drop the final partial global batch of an epoch. With False it is
            yielded, sliced the same way, so later ranks may get fewer (even zero) indices.

    Iterating yields the remaining batches of the current epoch and then advances to the
    next epoch, so ``for batch in sampler`` once per epoch walks through successive epochs.
    The state is advanced *before* each batch is handed out: a checkpoint saved after
    training on a batch resumes with the next one. (With a prefetching DataLoader the
    sampler runs ahead of training; save the state computed from the trainer's own step
    count via ``state_for_step`` in that case.)
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"model.global_batch_size={global_batch_size} must be a positive multiple of the "
                f"data-parallel size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        if dataset_len < 1:
            raise ValueError("cannot sample from an empty dataset")
        if drop_last and dataset_len < global_batch_size:
            raise ValueError(
                f"the dataset has {dataset_len} samples, fewer than model.global_batch_size={global_batch_size}, "
                "so no full batch can be formed; use a smaller global batch size or more data"
            )
        self.dataset_len = int(dataset_len)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.micro_size = self.global_batch_size // self.dp_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.consumed_samples = 0  # within the current epoch, summed over all ranks

    @property
    def samples_per_epoch(self) -> int:
        """Samples actually used per epoch (the dataset minus a dropped partial batch)."""
        if self.drop_last:
            return self.dataset_len - self.dataset_len % self.global_batch_size
        return self.dataset_len

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.samples_per_epoch // self.global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_order(self, epoch: int) -> List[int]:
        """The order in which epoch ``epoch`` visits the dataset (same on every rank)."""
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def global_batch(self, epoch: int, consumed_samples: int) -> List[int]:
        """All ranks' indices of the batch starting ``consumed_samples`` into ``epoch``."""
        end = min(consumed_samples + self.global_batch_size, self.samples_per_epoch)
        return self.epoch_order(epoch)[consumed_samples:end]

    def rank_slice(self, global_batch: List[int]) -> List[int]:
        """This rank's contiguous part of a global batch."""
        start = self.dp_rank * self.micro_size
        return global_batch[start : start + self.micro_size]

    def __iter__(self) -> Iterator[List[int]]:
        if self.consumed_samples >= self.samples_per_epoch:
            self.epoch, self.consumed_samples = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        while self.consumed_samples < self.samples_per_epoch:
            end = min(self.consumed_samples + self.global_batch_size, self.samples_per_epoch)
            batch = order[self.consumed_samples : end]
            self.consumed_samples = end
            yield self.rank_slice(batch)
        self.epoch, self.consumed_samples = self.epoch + 1, 0

    def state_for_step(self, step: int) -> Dict[str, int]:
        """The state after ``step`` global batches from the start of training.

        Assumes a constant global batch size from the start of training.
        """
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._state(epoch, min(within * self.global_batch_size, self.samples_per_epoch))

    def state_dict(self) -> Dict[str, int]:
        return self._state(self.epoch, self.consumed_samples)

    def _state(self, epoch: int, consumed_samples: int) -> Dict[str, int]:
        return {
            "epoch": epoch,
            "consumed_samples": consumed_samples,
            # Recorded only to detect a resume on different data, which silently changes the order.
            "dataset_len": self.dataset_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("dataset_len", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                logger.warning(
                    "resuming data sampler with %s=%s but the checkpoint was saved with %s=%s; "
                    "the sample order will differ from the original run",
                    key, getattr(self, key), key, state[key],
                )
        self.epoch = int(state["epoch"])
        self.consumed_samples = int(state["consumed_samples"])
        if self.consumed_samples < 0 or self.epoch < 0:
            raise ValueError(f"invalid sampler state {state}")
