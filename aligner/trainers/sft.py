"""Supervised fine-tuning: next-token loss on answer tokens only."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from aligner.models.gpt import position_ids_for
from aligner.objectives.sft import language_model_loss_sum_and_count
from aligner.training import loop
from aligner.training.run import Run


class SFTLoss:
    """Per micro-batch: tokens [B,S], labels [B,S] (tokens shifted by one), loss_mask [B,S]."""

    metric_names = ("loss",)

    def forward(self, model, batch):
        tokens = batch["tokens"]
        # With labels, megatron returns per-token cross-entropy [B,S] (vocab-parallel under TP).
        output = model(tokens, position_ids_for(tokens), None, labels=batch["labels"])

        def loss_fn(per_token_nll):
            nll_sum, count = language_model_loss_sum_and_count(-per_token_nll.float(), batch["loss_mask"])
            return nll_sum, count, {"loss": torch.stack([nll_sum.detach().float(), count.detach().float()])}

        return output, loss_fn


def sft_loop_data(cfg: DictConfig, run: Run) -> loop.LoopData:
    from aligner.data.collate import collate_sft
    from aligner.data.sft import SFTDataset

    data_cfg = cfg.model.data
    common = dict(tokenizer=run.tokenizer, max_seq_length=int(cfg.model.encoder_seq_length),
                  prompt_template=data_cfg.prompt_template, truncation=data_cfg.truncation,
                  apply_chat_template=bool(data_cfg.get("apply_chat_template", False)))
    train = SFTDataset(data_cfg.train_ds.file_path, **common)
    val = SFTDataset(data_cfg.validation_ds.file_path, **common) if data_cfg.validation_ds.file_path else None
    pad_id = run.tokenizer.pad_id
    return loop.LoopData(
        train=train,
        validation=val,
        collate=lambda items, length: collate_sft(items, pad_id, pad_to_length=length),
        length_of=lambda item: int(item["tokens"].shape[0]),
    )


def train(cfg: DictConfig, schema) -> dict:
    run = Run(cfg, "sft", schema)
    try:
        data = sft_loop_data(cfg, run)
        return loop.fit(run, SFTLoss(), data, plot_keys=("train/loss", "val/loss", "train/lr", "train/grad_norm"))
    finally:
        run.finish()
