"""DPO and its relatives (IPO, RPO) against a frozen reference policy.

The reference is the initial policy's weights parked in host memory (no optimizer state, no
accelerator memory); for every global batch they are swapped in once to compute reference
log-probs for all micro-batches, then swapped out before the training step.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from aligner.models.gpt import next_token_logits
from aligner.models.weight_swap import ParkedWeights
from aligner.objectives.logprobs import sequence_logprobs, token_logprobs_from_logits, trailing_token_logprobs
from aligner.objectives.masks import first_masked_column
from aligner.objectives.preference import PREFERENCE_LOSS_TYPES, preference_loss
from aligner.trainers.reward_model import comparison_loop_data
from aligner.training import loop
from aligner.training.reference import park_initial_weights
from aligner.training.run import Run
from aligner.training.step import ForwardOnly, collect_forward, mean_metric


class ReferenceLogProbs(ForwardOnly):
    """The reference's per-token log-probs [2B,S] and, for validation, its whole next-token
    distribution (for the exact KL of the policy to it)."""

    def __init__(self, keep_distribution: bool = False):
        self.keep_distribution = keep_distribution

    def run(self, model, batch):
        return next_token_logits(model, batch["tokens"], first_masked_column(batch["loss_mask"]))

    def outputs(self, logits, batch):  # logits of the columns from the first answer column on
        out = {"token_logps": trailing_token_logprobs(logits, batch["labels"])}
        if self.keep_distribution:  # [2B, S - start, V]: the same columns as the policy's in the loss
            out["log_probs_full"] = torch.log_softmax(logits.float(), dim=-1)
        return out


class PreferenceLoss:
    metric_names = ("loss", "preference_accuracy", "implicit_reward_margin", "chosen_implicit_reward",
                    "rejected_implicit_reward", "chosen_logps", "rejected_logps", "sft_loss",
                    "kl_to_ref")

    def __init__(self, beta: float, loss_type: str, average_log_probs: bool, sft_loss_weight: float,
                 preference_loss_weight: float, gt_reward_scale: float):
        if loss_type not in PREFERENCE_LOSS_TYPES:
            raise ValueError(f"model.dpo.preference_loss={loss_type!r}; choose one of {list(PREFERENCE_LOSS_TYPES)}")
        if beta <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty must be > 0, got {beta}")
        self.beta, self.loss_type, self.average = beta, loss_type, average_log_probs
        self.sft_weight, self.pref_weight, self.gt_scale = sft_loss_weight, preference_loss_weight, gt_reward_scale

    def forward(self, model, batch):
        start = first_masked_column(batch["loss_mask"])  # the columns before it count for nothing
        output = next_token_logits(model, batch["tokens"], start)

        def loss_fn(logits):  # [2B, S - start, V]
            logits = logits.float()
            token_lp = token_logprobs_from_logits(logits, batch["labels"][:, start:])
            mask = batch["loss_mask"][:, start:]
            ref_token_lp = batch["ref_token_logps"][:, start:]
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
            sums = {name: mean_metric(metrics[name], pairs) for name in self.metric_names if name in metrics}
            sums["loss"] = mean_metric(total, pairs)
            sums["sft_loss"] = mean_metric(sft, pairs)
            if "ref_log_probs_full" in batch:  # validation: exact KL(policy || reference) per response token
                with torch.no_grad():
                    log_p = torch.log_softmax(logits, dim=-1)
                    kl_tokens = (log_p.exp() * (log_p - batch["ref_log_probs_full"])).sum(-1)
                    sums["kl_to_ref"] = torch.stack([(kl_tokens * mask).sum(), mask.sum().float()])
            return total * pairs, torch.tensor(pairs), sums

        return output, loss_fn


def attach_reference_logprobs(run: Run, reference: ParkedWeights, micro_batches: list[dict],
                              keep_distribution: bool = False) -> None:
    with reference.swapped_in(run.model):
        records = collect_forward(run.model, ReferenceLogProbs(keep_distribution), micro_batches)
    if records is not None:
        for micro, record in zip(micro_batches, records):
            micro["ref_token_logps"] = record["token_logps"]
            if keep_distribution:
                micro["ref_log_probs_full"] = record["log_probs_full"]
    else:  # non-last pipeline stages never read them; keep the key for a uniform batch layout
        for micro in micro_batches:
            micro["ref_token_logps"] = torch.zeros_like(micro["loss_mask"])


def train(cfg: DictConfig, schema) -> dict:
    # Resumed only after the reference is parked: parking the live initial weights needs no
    # rebuild, and rebuilding after a resume would re-seed the RNG streams the checkpoint restored.
    run = Run(cfg, "dpo", schema, resume=False)
    try:
        dpo = cfg.model.dpo
        loss = PreferenceLoss(
            beta=float(dpo.ref_policy_kl_penalty), loss_type=str(dpo.preference_loss),
            average_log_probs=bool(dpo.preference_average_log_probs), sft_loss_weight=float(dpo.sft_loss_weight),
            preference_loss_weight=float(dpo.preference_loss_weight), gt_reward_scale=float(dpo.gt_reward_scale),
        )
        reference = park_initial_weights(run)  # the initial policy, captured before any resume
        run.resume_latest()
        data = comparison_loop_data(cfg, run)

        def prepare(micro_batches: list[dict], training: bool) -> list[dict]:
            # validation also measures the exact KL to the reference (needs its full distribution)
            attach_reference_logprobs(run, reference, micro_batches, keep_distribution=not training)
            return micro_batches

        return loop.fit(run, loss, data, prepare=prepare,
                        plot_keys=("train/loss", "val/loss", "val/preference_accuracy", "val/implicit_reward_margin",
                                   "val/kl_to_ref", "train/chosen_logps"))
    finally:
        run.finish()
