"""One optimizer step (or one forward-only pass) over a list of micro-batches.

Runs megatron's forward/backward schedule, so gradient accumulation, data-parallel gradient
reduction and pipeline parallelism all come from megatron-core. A trainer supplies a
`MicroBatchLoss`: how to run its model on one micro-batch and turn the output into
(loss_sum, count, metric sums). Gradients are divided by the *global* count (tokens or pairs
over all micro-batches and data-parallel ranks), so any DP/micro-batch layout gives the same
update as one process with the same global batch.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.distributed as dist

LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class MicroBatchLoss(Protocol):
    metric_names: Sequence[str]

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], LossResult]]:
        """Run `model` on `batch`; return (output, loss_fn). loss_fn(output) -> (loss_sum, count, sums).

        `sums` maps each metric name to tensor([sum, count]) so it can be averaged exactly later.
        """


class ForwardOnly:
    """A forward-only pass for ``collect_forward``: how to run the model on a micro-batch
    (``run``) and what to hand back per row (``outputs``). There is no loss; megatron's schedule
    still wants one, so a zero is returned in its place."""

    metric_names: Sequence[str] = ()

    def run(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, model, batch):
        output = self.run(model, batch)

        def loss_fn(output):
            records = self.outputs(output, batch)
            zero = torch.zeros((), device=output.device)
            return zero, torch.ones((), dtype=torch.int, device=output.device), records

        return output, loss_fn


def mean_metric(mean: torch.Tensor, count) -> torch.Tensor:
    """A batch mean as tensor([sum, count]), so means over micro-batches and ranks stay exact."""
    count = torch.as_tensor(count, dtype=torch.float32)
    return torch.stack([mean.detach().float() * count, count])


def _as_megatron_loss(loss_fn):
    def wrapped(output):
        loss_sum, count, sums = loss_fn(output)
        return loss_sum, count.to(torch.int).reshape(()), sums

    return wrapped


def _run_schedule(model, loss: MicroBatchLoss, micro_batches: list[dict], forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output, loss_fn = loss.forward(model_chunk, batch)
        return output, _as_megatron_loss(loss_fn)

    first = micro_batches[0]
    seq = int(first["tokens"].shape[1])
    mbs = int(first["tokens"].shape[0])
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def reduce_metrics(per_micro_batch: Iterable[dict], names: Sequence[str]) -> dict[str, float]:
    """Exact mean of each metric over micro-batches, pipeline stages and data-parallel ranks."""
    from megatron.core import parallel_state

    per_micro_batch = list(per_micro_batch or [])
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for record in per_micro_batch:
        for i, name in enumerate(names):
            if name in record:
                totals[i] += record[name].detach().to(torch.float64).reshape(2)
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        totals = totals.cpu()
    return {
        name: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan")
        for i, name in enumerate(names)
    }


def train_step(model, optimizer, scheduler, loss: MicroBatchLoss, micro_batches: list[dict]) -> dict[str, float]:
    """Forward/backward over all micro-batches, then one optimizer and scheduler step."""
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    records = _run_schedule(model, loss, micro_batches, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    metrics = _finalize(loss, reduce_metrics(records, loss.metric_names))
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["update_skipped"] = float(not update_ok)
    return metrics


@torch.no_grad()
def _forward_only(model, loss: MicroBatchLoss, micro_batches: list[dict]):
    was_training = model.training
    model.eval()
    try:
        return _run_schedule(model, loss, micro_batches, forward_only=True)
    finally:
        model.train(was_training)


def evaluate(model, loss: MicroBatchLoss, micro_batches: list[dict]) -> dict[str, float]:
    """Forward-only pass over micro-batches; returns exact metric means."""
    return _finalize(loss, reduce_metrics(_forward_only(model, loss, micro_batches), loss.metric_names))


def _finalize(loss: MicroBatchLoss, metrics: dict[str, float]) -> dict[str, float]:
    """Optional hook: derive metrics that are not plain means (e.g. a std from two means)."""
    finalize = getattr(loss, "finalize_metrics", None)
    return finalize(metrics) if finalize else metrics


def split_micro_batches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Cut a collated batch (every tensor has the batch dim first) into micro-batches."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    out = []
    for start in range(0, size, micro_batch_size):
        out.append({k: (v[start:start + micro_batch_size] if isinstance(v, torch.Tensor) else v)
                    for k, v in batch.items()})
    return out


def collect_forward(model, loss: MicroBatchLoss, micro_batches: list[dict]) -> list[dict] | None:
    """Forward-only pass returning each micro-batch's raw per-row outputs (the `sums` dict).

    Only the last pipeline stage has outputs; other stages get None (they never need them).
    """
    from megatron.core import parallel_state

    records = _forward_only(model, loss, micro_batches)
    return list(records) if parallel_state.is_pipeline_last_stage() else None
