"""DPO and its relatives (IPO, RPO) against a frozen reference policy.

The reference is the initial policy's weights parked in host memory (no optimizer state, no
accelerator memory); for every global batch they are swapped in once to compute reference
log-probs for all micro-batches, then swapped out before the training step.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from aligner.models.gpt import position_ids_for
from aligner.models.weight_swap import ParkedWeights
from aligner.objectives.logprobs import sequence_logprobs
from aligner.objectives.ppo import approx_kl_k3
from aligner.objectives.preference import PREFERENCE_LOSS_TYPES, preference_loss
from aligner.trainers.reward_model import comparison_loop_data, pair_metric
from aligner.training import loop
from aligner.training.reference import park_initial_weights
from aligner.training.run import Run
from aligner.training.step import collect_forward


def answer_token_logprobs(model, batch) -> torch.Tensor:
    """[2B,S] log-prob of each next token (megatron's vocab-parallel cross-entropy, negated)."""
    tokens = batch["tokens"]
    return model(tokens, position_ids_for(tokens), None, labels=batch["labels"])


class ReferenceLogProbs:
    """Forward-only 'loss' that hands back per-row reference log-probs (sequence and per token)."""

    metric_names = ()

    def forward(self, model, batch):
        output = answer_token_logprobs(model, batch)

        def loss_fn(per_token_nll):
            token_lp = -per_token_nll.float()
            return torch.zeros(()), torch.tensor(1), {"token_logps": token_lp}

        return output, loss_fn


class PreferenceLoss:
    metric_names = ("loss", "preference_accuracy", "implicit_reward_margin", "chosen_implicit_reward",
                    "rejected_implicit_reward", "chosen_logps", "rejected_logps", "sft_loss",
                    "kl_to_ref_k3")

    def __init__(self, beta: float, loss_type: str, average_log_probs: bool, sft_loss_weight: float,
                 preference_loss_weight: float, gt_reward_scale: float):
        if loss_type not in PREFERENCE_LOSS_TYPES:
            raise ValueError(f"model.dpo.preference_loss={loss_type!r}; choose one of {list(PREFERENCE_LOSS_TYPES)}")
        if beta <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {beta}")
        self.beta, self.loss_type, self.average = beta, loss_type, average_log_probs
        self.sft_weight, self.pref_weight, self.gt_scale = sft_loss_weight, preference_loss_weight, gt_reward_scale

    def forward(self, model, batch):
        output = answer_token_logprobs(model, batch)

        def loss_fn(per_token_nll):
            token_lp = -per_token_nll.float()
            mask = batch["loss_mask"]
            ref_token_lp = batch["ref_token_logps"]
            logps = sequence_logprobs(token_lp, mask, self.average)
            ref_logps = sequence_logprobs(ref_token_lp, mask, self.average)
            pairs = logps.shape[0] // 2
            gt = batch["gt_rewards"]
            needs_gt = self.loss_type.startswith("rpo")
            loss, metrics = preference_loss(
                logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], self.beta, self.loss_type,
                chosen_gt_rewards=gt[:pairs] if needs_gt else None,
                rejected_gt_rewards=gt[pairs:] if needs_gt else None,
                gt_reward_scale=self.gt_scale,
            )
            chosen_mask = mask[:pairs]
            sft = -sequence_logprobs(token_lp[:pairs], chosen_mask, True).mean()
            total = self.pref_weight * loss + self.sft_weight * sft
            kl = approx_kl_k3(token_lp.detach(), ref_token_lp, mask)
            sums = {name: pair_metric(metrics[name], pairs) for name in self.metric_names if name in metrics}
            sums["loss"] = pair_metric(total, pairs)
            sums["sft_loss"] = pair_metric(sft, pairs)
            sums["kl_to_ref_k3"] = torch.stack([kl.detach().float() * mask.sum(), mask.sum().float()])
            return total * pairs, torch.tensor(pairs), sums

        return output, loss_fn


def attach_reference_logprobs(run: Run, reference: ParkedWeights, micro_batches: list[dict]) -> None:
    with reference.swapped_in(run.model):
        records = collect_forward(run.model, ReferenceLogProbs(), micro_batches)
    if records is not None:
        for micro, record in zip(micro_batches, records):
            micro["ref_token_logps"] = record["token_logps"]
    else:  # non-last pipeline stages never read them; keep the key for a uniform batch layout
        for micro in micro_batches:
            micro["ref_token_logps"] = torch.zeros_like(micro["loss_mask"])


def train(cfg: DictConfig, schema) -> dict:
    run = Run(cfg, "dpo", schema)
    try:
        dpo = cfg.model.dpo
        loss = PreferenceLoss(
            beta=float(dpo.ref_policy_kl_penalty), loss_type=str(dpo.preference_loss),
            average_log_probs=bool(dpo.preference_average_log_probs), sft_loss_weight=float(dpo.sft_loss_weight),
            preference_loss_weight=float(dpo.preference_loss_weight), gt_reward_scale=float(dpo.gt_reward_scale),
        )
        # Parked before any resume: the reference is always the initial policy.
        reference = park_initial_weights(run)
        data = comparison_loop_data(cfg, run)

        def prepare(micro_batches: list[dict]) -> list[dict]:
            attach_reference_logprobs(run, reference, micro_batches)
            return micro_batches

        return loop.fit(run, loss, data, prepare=prepare,
                        plot_keys=("train/loss", "val/loss", "val/preference_accuracy", "val/implicit_reward_margin",
                                   "val/kl_to_ref_k3", "train/chosen_logps"))
    finally:
        run.finish()
