"""The step loop SFT, reward-model and DPO training share.

    for step in range(resume_step, max_steps):
        this rank's slice of the next global batch -> micro-batches -> train_step
        log metrics; every val_check_interval: validation; every save_interval: checkpoint
    final validation, checkpoint, plot

The data position (sampler state) is part of each checkpoint, so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from aligner.faults import fault_point
from aligner.training.plots import plot_curves
from aligner.training.run import Run
from aligner.training.step import MicroBatchLoss, evaluate, train_step

log = logging.getLogger("aligner.loop")


@dataclass
class LoopData:
    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset | None
    collate: Callable[[list, int | None], dict]  # (items, pad_to_length) -> micro-batch dict
    length_of: Callable[[dict], int]  # an item's padded-row length, to pad every micro-batch alike


def micro_batches_for(items: list, micro_batch_size: int, data: LoopData, pad_multiple: int = 1) -> list[dict]:
    """Collate items into micro-batches that share one sequence length (pipeline stages need it)."""
    longest = max(data.length_of(item) for item in items)
    length = -(-longest // pad_multiple) * pad_multiple
    return [data.collate(items[i:i + micro_batch_size], length) for i in range(0, len(items), micro_batch_size)]


def validation_batches(run: Run, dataset, limit_batches: int | None) -> list[list[int]]:
    """This rank's fixed validation index lists (same every time, so curves are comparable)."""
    dp, rank = run.layout.data_parallel, run.layout.dp_rank
    per_rank = run.micro_batch_size
    step = per_rank * dp
    usable = (len(dataset) // step) * step
    if usable == 0:
        raise ValueError(f"validation set has {len(dataset)} samples, fewer than micro_batch_size x "
                         f"data-parallel size = {step}")
    batches = []
    for start in range(0, usable, step):
        batches.append(list(range(start + rank * per_rank, start + (rank + 1) * per_rank)))
        if limit_batches and len(batches) >= limit_batches:
            break
    return batches


def run_validation(run: Run, loss: MicroBatchLoss, data: LoopData, index_batches: list[list[int]],
                   prepare: Callable[[list[dict], bool], list[dict]] | None = None) -> dict[str, float]:
    items = [data.validation[i] for batch in index_batches for i in batch]
    micro = micro_batches_for(items, run.micro_batch_size, data)
    return evaluate(run.model, loss, prepare(micro, False) if prepare else micro)


def endless(sampler):
    while True:  # each pass is one epoch; the sampler reshuffles with seed + epoch
        yield from sampler


def fit(run: Run, loss: MicroBatchLoss, data: LoopData, plot_keys: Sequence[str] = (),
        on_train_end: Callable[[], dict] | None = None,
        prepare: Callable[[list[dict], bool], list[dict]] | None = None) -> dict[str, float]:
    """Train to trainer.<algo>.max_steps; returns the last validation metrics.

    `prepare(micro_batches, training)` runs on every list of micro-batches before use (e.g. DPO
    adds reference log-probs).
    `on_train_end` may return extra state (e.g. reward standardisation) for the final checkpoint.
    """
    from aligner.data.samplers import DistributedResumableSampler

    cfg = run.loop_cfg
    sampler = DistributedResumableSampler(
        dataset_len=len(data.train), global_batch_size=run.global_batch_size, dp_rank=run.layout.dp_rank,
        dp_size=run.layout.data_parallel, seed=int(run.cfg.model.seed), shuffle=True, drop_last=True,
    )
    if run.resume_state.get("sampler"):
        sampler.load_state_dict(run.resume_state["sampler"])
    batches = endless(sampler)
    val_every = int(cfg.val_check_interval or 0)
    save_every = int(cfg.save_interval or 0)
    val_index = (validation_batches(run, data.validation, cfg.get("limit_val_batches"))
                 if data.validation is not None else [])
    last_val: dict[str, float] = {}

    def validate():
        nonlocal last_val
        if not val_index:
            return
        last_val = run_validation(run, loss, data, val_index, prepare)
        run.metrics.log(run.step, {f"val/{k}": v for k, v in last_val.items()})
        if run.is_rank_zero:
            log.info("step %d validation: %s", run.step, _fmt(last_val))

    if run.step == 0 and val_every:
        validate()
    bar = tqdm(total=run.max_steps, initial=run.step, disable=not run.is_rank_zero, desc=run.algorithm,
               dynamic_ncols=True)
    while run.step < run.max_steps:
        t0 = time.perf_counter()
        indices = next(batches)
        items = [data.train[i] for i in indices]
        micro = micro_batches_for(items, run.micro_batch_size, data)
        if prepare:
            micro = prepare(micro, True)
        metrics = train_step(run.model, run.optimizer, run.scheduler, loss, micro)
        run.step += 1
        elapsed = time.perf_counter() - t0
        tokens = sum(int(m["tokens"].numel()) for m in micro) * run.layout.data_parallel
        metrics.update(step_time_s=elapsed, tokens_per_s=tokens / max(elapsed, 1e-9))
        run.metrics.log(run.step, {f"train/{k}": v for k, v in metrics.items()})
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in list(loss.metric_names)[:2]})
        if val_every and run.step % val_every == 0:
            validate()
        if save_every and run.step % save_every == 0 and run.step < run.max_steps:
            run.save_checkpoint({"sampler": sampler.state_dict()})
        fault_point("train.after_step")
    bar.close()
    if val_every and run.step % val_every != 0:
        validate()
    extra = on_train_end() if on_train_end else {}
    run.save_checkpoint({"sampler": sampler.state_dict(), **extra})
    if run.is_rank_zero:
        keys = list(plot_keys) or sorted(run.metrics.history)
        path = plot_curves(run.metrics.history, run.log_dir / "curves.png", keys, title=run.algorithm)
        if path:
            log.info("wrote %s", path)
    return last_val


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
