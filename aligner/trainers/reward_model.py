"""Reward-model training: Bradley-Terry loss on (chosen, rejected) pairs.

The model is the policy trunk with a scalar head; the reward of a sequence is the head's output
at its last token. Initialised from an SFT checkpoint (native or Hugging Face) with a fresh head.
"""
from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig

from aligner.models.gpt import position_ids_for
from aligner.objectives.preference import bradley_terry_loss
from aligner.training import loop
from aligner.training.run import Run
from aligner.training.step import evaluate, mean_metric

log = logging.getLogger("aligner.rm")


def last_token_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B,S,1] or [B,S], lengths [B] -> the value at each row's last real token [B]."""
    values = values.reshape(values.shape[0], values.shape[1])
    return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1).float()


class BradleyTerryLoss:
    """Micro-batch: 2B rows (chosen rows, then rejected rows) with their lengths."""

    metric_names = ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "reward_mean",
                    "reward_sq_mean")

    def forward(self, model, batch):
        tokens = batch["tokens"]
        values = model(tokens, position_ids_for(tokens), None)

        def loss_fn(values):
            rewards = last_token_values(values, batch["lengths"])
            pairs = rewards.shape[0] // 2
            loss, metrics = bradley_terry_loss(rewards[:pairs], rewards[pairs:])
            sums = {
                "loss": mean_metric(loss, pairs),
                "accuracy": mean_metric(metrics["accuracy"], pairs),
                "reward_margin": mean_metric(metrics["reward_margin"], pairs),
                "chosen_reward": mean_metric(metrics["chosen_reward_mean"], pairs),
                "rejected_reward": mean_metric(metrics["rejected_reward_mean"], pairs),
                "reward_mean": mean_metric(rewards.mean(), 2 * pairs),
                "reward_sq_mean": mean_metric((rewards ** 2).mean(), 2 * pairs),
            }
            return loss * pairs, torch.tensor(pairs), sums

        return values, loss_fn

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return add_reward_std(metrics)


def add_reward_std(metrics: dict[str, float]) -> dict[str, float]:
    if "reward_sq_mean" in metrics:
        var = metrics.pop("reward_sq_mean") - metrics.get("reward_mean", 0.0) ** 2
        metrics["reward_std"] = math.sqrt(max(var, 0.0))
    return metrics


def comparison_loop_data(cfg: DictConfig, run: Run) -> loop.LoopData:
    from aligner.data.collate import collate_comparisons
    from aligner.data.comparisons import ComparisonDataset

    data_cfg = cfg.model.data
    common = dict(tokenizer=run.tokenizer, max_seq_length=int(cfg.model.encoder_seq_length),
                  truncation=data_cfg.truncation, apply_chat_template=bool(data_cfg.get("apply_chat_template", False)))
    train = ComparisonDataset(data_cfg.train_ds.file_path, **common)
    val = ComparisonDataset(data_cfg.validation_ds.file_path, **common) if data_cfg.validation_ds.file_path else None
    pad_id = run.tokenizer.pad_id
    return loop.LoopData(
        train=train,
        validation=val,
        collate=lambda items, length: collate_comparisons(items, pad_id, pad_to_length=length),
        length_of=lambda item: max(int(item["chosen"].shape[0]), int(item["rejected"].shape[0])),
    )


def reward_statistics(run: Run, data: loop.LoopData) -> dict:
    """Mean and std of rewards over the validation pairs, saved for the critic server's standardisation."""
    index = loop.validation_batches(run, data.validation, None)
    items = [data.validation[i] for batch in index for i in batch]
    metrics = evaluate(run.model, BradleyTerryLoss(), loop.micro_batches_for(items, run.micro_batch_size, data))
    return {"mean": metrics["reward_mean"], "std": max(metrics["reward_std"], 1e-6)}


def train(cfg: DictConfig, schema) -> dict:
    run = Run(cfg, "rm", schema, scalar_head=True)
    try:
        data = comparison_loop_data(cfg, run)
        standardize = cfg.model.reward_standardization

        def on_train_end() -> dict:
            if not standardize.enable:
                return {}
            if standardize.mean is not None and standardize.std is not None:
                stats = {"mean": float(standardize.mean), "std": float(standardize.std)}
            else:
                stats = reward_statistics(run, data)
            log.info("reward standardisation: mean=%.4f std=%.4f", stats["mean"], stats["std"])
            return {"reward_standardization": stats}

        return loop.fit(run, BradleyTerryLoss(), data, on_train_end=on_train_end,
                          plot_keys=("train/loss", "val/loss", "train/accuracy", "val/accuracy",
                                     "val/reward_margin", "val/reward_std"))
    finally:
        run.finish()
