"""The rollout engine: what every online algorithm (PPO, GRPO, RLOO, REINFORCE++, ReMax, ...) shares.

One step, as ``RolloutEngine.step`` reads:
  offload Adam states → the algorithm's ``rollout`` (prompts → n samples each with our KV-cache
  sampler or TensorRT-LLM; every micro-batch handed to the scorer as soon as it exists) →
  actor log-probs → reference log-probs (initial weights parked in host memory, swapped in) →
  scores (rewards, validity, critic values) → the algorithm's ``advantages`` → restore Adam
  states → policy update (epochs × mini-batches, clipped ratio, entropy bonus, optional KL loss,
  ``loss_agg_mode``) → refit the generation backend → metrics.

``train`` loops ``step`` with validation, tied checkpoints and exact resume. An algorithm is a
small object (see ``Algorithm``) that chooses the scorer and turns scores into advantages; PPO
adds its critic, GRPO its estimators. Benchmarks and tests call ``step`` directly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from aligner.data.collate import collate_prompts
from aligner.data.prompts import PromptDataset
from aligner.data.samplers import DistributedResumableSampler
from aligner.distributed.collectives import broadcast_tensor_parallel, max_over_world, weighted_mean_over_ranks
from aligner.distributed.setup import all_reduce_sum_dp
from aligner.faults import fault_point
from aligner.generation.backend import build_backend
from aligner.generation.params import SamplingParams
from aligner.generation.streams import stream_key
from aligner.models.gpt import next_token_logits
from aligner.objectives.kl import token_kl
from aligner.objectives.logprobs import entropy_from_logits, token_logprobs_from_logits, trailing_token_logprobs
from aligner.objectives.masked import masked_mean
from aligner.objectives.masks import first_masked_column, response_mask
from aligner.objectives.policy_loss import (
    aggregate_loss,
    aggregation_count,
    check_loss_agg_mode,
    clipped_policy_loss,
)
from aligner.objectives.ppo import approx_kl_k3, entropy_bonus
from aligner.rollout.batch import Rollouts, concat_rollouts, pad_columns
from aligner.rollout.scorers import Chunk, Scorer
from aligner.training.loop import endless
from aligner.training.offload import OptimizerStateOffloader
from aligner.training.plots import plot_curves
from aligner.training.reference import park_initial_weights
from aligner.training.run import Run
from aligner.training.step import ForwardOnly, collect_forward, mean_metric, train_step

log = logging.getLogger("aligner.rollout")
VALIDATION_STREAM = 0x5A1  # the first part of validation's stream keys (training's is the run seed)


# ----------------------------------------------------------------------------- settings
@dataclass
class UpdateSettings:
    """How the policy learns from one batch of rollouts."""

    epochs: int
    mini_batch_size: int  # rows per optimizer step, over all data-parallel ranks
    micro_batch_size: int
    clip_ratio_low: float
    clip_ratio_high: float | None = None  # None: symmetric
    clip_ratio_c: float | None = None  # dual clip
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm's divisor
    kl_loss_coef: float = 0.0  # KL to the reference as a loss term (GRPO's use_kl_loss)
    kl_loss_type: str = "k3"


@dataclass
class EngineSettings:
    loop_key: str  # trainer.<loop_key> holds max_steps, val_check_interval, save_interval, val_prompts
    prompts_per_step: int  # over all data-parallel ranks
    samples_per_prompt: int
    rollout_micro_batch_size: int
    forward_micro_batch_size: int
    offload_adam_states: bool
    offload_device: str
    sampling: dict
    length: dict
    val_greedy: bool
    update: UpdateSettings
    needs_reference: bool = True
    plot_keys: tuple[str, ...] = ()
    title: str = ""


@dataclass
class PolicySignal:
    """What the policy update needs besides the rollouts."""

    advantages: torch.Tensor  # [N,S]
    policy_mask: torch.Tensor  # [N,S] the tokens the policy loss counts
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Algorithm(Protocol):
    """The part of an online algorithm that is its own; everything else is the engine's."""

    scorer: Scorer

    def rollout(self, engine: "RolloutEngine") -> Rollouts:
        """This step's batch (``engine.sample_step_batch()`` unless the algorithm filters/resamples)."""

    def advantages(self, engine: "RolloutEngine", rollouts: Rollouts) -> PolicySignal: ...

    def before_scores(self, engine: "RolloutEngine") -> dict[str, float]:
        """Called before the scores are collected (PPO: the previous critic update's result)."""

    def after_advantages(self, engine: "RolloutEngine", rollouts: Rollouts, signal: PolicySignal) -> None:
        """PPO: fire the critic's train request."""

    def trains_policy(self, step: int) -> bool: ...

    def after_update(self, engine: "RolloutEngine") -> dict[str, float]: ...

    def checkpoint_state(self, engine: "RolloutEngine") -> dict:
        """Extra trainer state for the actor's checkpoint (PPO: saves the critic, returns the pairing)."""

    def resumed(self, engine: "RolloutEngine") -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- model passes
class TokenLogProbs(ForwardOnly):
    """Per-token log-probs [B,S] (index t = log p(token t+1)); 0 before the micro-batch's first
    response column (never read: every use is masked to responses)."""

    def run(self, model, batch):
        return next_token_logits(model, batch["tokens"], first_masked_column(batch["mask"]))

    def outputs(self, logits, batch):  # logits of the columns from the first response column on
        return {"logprobs": trailing_token_logprobs(logits, batch["labels"])}


class PolicyLoss:
    """Clipped-ratio policy loss − entropy bonus (+ KL to the reference), aggregated by
    ``loss_agg_mode``. Returns (numerator, count): megatron divides the gradients by the count
    summed over micro-batches and data-parallel ranks, so any split makes the same update."""

    metric_names = ("policy_loss", "clip_fraction", "approx_kl", "entropy", "ratio_mean", "kl_loss")

    def __init__(self, settings: UpdateSettings):
        self.s = settings
        check_loss_agg_mode(settings.loss_agg_mode)

    def forward(self, model, batch):
        start = first_masked_column(batch["policy_mask"])  # the columns before it are all masked
        logits = next_token_logits(model, batch["tokens"], start)

        def loss_fn(logits):  # [B, S - start, V]
            s = self.s
            part = {k: v[:, start:] for k, v in batch.items() if k in ("policy_mask", "labels", "old_logprobs",
                                                                       "advantages", "ref_logprobs")}
            mask = part["policy_mask"]
            logprobs = token_logprobs_from_logits(logits.float(), part["labels"])
            # Masked columns count for nothing, but their values still pass through exp() in the
            # ratio and in k3: there, old and reference log-probs may be zeros (reused sampler
            # log-probs, or a log-prob micro-batch that started later), and exp(0 - (-100))
            # would be inf and its masked gradient 0 * inf = NaN. Make them the policy's own.
            own = logprobs.detach()
            for key in ("old_logprobs", "ref_logprobs"):
                if key in part:
                    part[key] = torch.where(mask > 0, part[key], own)
            # seq-mean-token-sum-norm divides by the padded width: the whole row's, not the slice's
            scale = s.loss_scale_factor if s.loss_scale_factor is not None else float(batch["policy_mask"].shape[-1])
            # each term is this micro-batch's own aggregate; times the local count it is the
            # micro-batch's share of the numerator of the global aggregate
            loss, metrics = clipped_policy_loss(logprobs, part["old_logprobs"], part["advantages"], mask,
                                                s.clip_ratio_low, s.clip_ratio_high, s.clip_ratio_c,
                                                s.loss_agg_mode, loss_scale_factor=scale)
            total = loss
            token_entropy = entropy_from_logits(logits.float())
            entropy = entropy_bonus(token_entropy, mask)  # the token mean, for the metric
            if s.entropy_coef:  # aggregated like the loss, or the split would change the update
                bonus = entropy if s.loss_agg_mode == "token-mean" else aggregate_loss(
                    token_entropy, mask, s.loss_agg_mode, loss_scale_factor=scale)
                total = total - s.entropy_coef * bonus
            kl = torch.zeros(())
            if s.kl_loss_coef:
                kl = aggregate_loss(token_kl(logprobs, part["ref_logprobs"], s.kl_loss_type), mask, s.loss_agg_mode,
                                    loss_scale_factor=scale)
                total = total + s.kl_loss_coef * kl
            count = aggregation_count(mask, s.loss_agg_mode)
            tokens_in = mask.sum()
            sums = {"policy_loss": mean_metric(loss, count), "entropy": mean_metric(entropy, tokens_in),
                    "kl_loss": mean_metric(kl, count),
                    **{k: mean_metric(metrics[k], tokens_in) for k in ("clip_fraction", "approx_kl", "ratio_mean")}}
            return total * count, count.round().to(torch.int), sums

        return logits, loss_fn


# ----------------------------------------------------------------------------- the engine
@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[f"timing/{name}_s"] = timings.get(f"timing/{name}_s", 0.0) + time.perf_counter() - start


def mean_over_dp(value: float, count: float) -> float:
    return weighted_mean_over_ranks(value, count)


def logprob_gap(rollouts: Rollouts, trainer_logprobs: torch.Tensor) -> tuple[float, dict[str, float]]:
    """How far the sampler's log-probs are from the trainer's on the same rows (response
    tokens): this rank's mean |gap|, and the metrics (|gap|, k3 KL estimate) averaged over the
    data-parallel ranks."""
    mask = rollouts.mask
    tokens = float(mask.sum())
    gap = float(masked_mean((rollouts.generator_logprobs - trainer_logprobs).abs(), mask))
    kl_error = approx_kl_k3(rollouts.generator_logprobs, trainer_logprobs, mask)
    return gap, {"generator_logprob_abs_gap": mean_over_dp(gap, tokens),
                 "generator_kl_error": mean_over_dp(float(kl_error), tokens)}


def average_updates(results: list[dict[str, float]]) -> dict[str, float]:
    if not results:
        return {}
    keys = results[0].keys()
    return {k: sum(r[k] for r in results) / len(results) for k in keys if not any(math.isnan(r[k]) for r in results)}


class RolloutEngine:
    """Owns the policy's Run, the reference weights, the generation backend, the prompts and
    their resumable sampler; runs an ``Algorithm`` step by step."""

    def __init__(self, cfg, schema, settings: EngineSettings, algorithm_factory):
        self.cfg, self.settings = cfg, settings
        s = settings
        self.rollouts_per_step = s.prompts_per_step * s.samples_per_prompt
        u = s.update
        if self.rollouts_per_step % u.mini_batch_size:
            raise ValueError(f"rollouts per step ({s.prompts_per_step} prompts x {s.samples_per_prompt} samples = "
                             f"{self.rollouts_per_step}) must be a multiple of the mini-batch "
                             f"({u.mini_batch_size} rows, model.global_batch_size)")
        self.mini_batches = self.rollouts_per_step // u.mini_batch_size
        loop = cfg.trainer[s.loop_key]
        self.run = run = Run(cfg, s.loop_key, schema,
                             optimizer_steps=int(loop.max_steps) * u.epochs * self.mini_batches)
        if run.layout.pipeline_parallel != 1:
            raise NotImplementedError("online generation needs model.pipeline_model_parallel_size=1")
        dp = run.layout.data_parallel
        if s.prompts_per_step % dp:
            raise ValueError(f"{s.prompts_per_step} prompts per step must be a multiple of the data-parallel size {dp}")
        if (self.rollouts_per_step // dp) % s.rollout_micro_batch_size:
            raise ValueError(f"rollouts per data-parallel rank ({self.rollouts_per_step // dp}) must be a multiple of "
                             f"the rollout micro-batch ({s.rollout_micro_batch_size})")
        self.reference = park_initial_weights(run) if s.needs_reference else None  # before anything trains
        self.offloader = OptimizerStateOffloader(run.optimizer, s.offload_device) if s.offload_adam_states else None
        seed = int(cfg.model.seed)
        self.sampling = SamplingParams.from_config(s.sampling, s.length, seed=seed)
        plain = {k: v for k, v in s.sampling.items() if k not in ("greedy", "use_greedy")}
        self.val_sampling = SamplingParams.from_config({**plain, "greedy": s.val_greedy}, s.length, seed=seed)
        self.greedy_sampling = SamplingParams.from_config({**plain, "greedy": True}, s.length, seed=seed)
        max_len = int(cfg.model.encoder_seq_length)
        trt_llm = _plain(cfg.trainer[s.loop_key].get("trt_llm")) or {}
        self.unload_engine_train = bool(trt_llm.get("enable")) and bool(trt_llm.get("unload_engine_train"))
        self.backend = build_backend(trt_llm, run.model,
                                     eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id,
                                     max_batch_size=s.rollout_micro_batch_size, max_sequence_length=max_len,
                                     tokenizer=run.tokenizer, vocab_size=run.model_config.vocab_size,
                                     export_weights=self.export_policy_weights)
        loop_cfg = cfg.trainer[s.loop_key]
        self.recompute_logprobs = bool(loop_cfg.get("recompute_logprobs", False))
        gap = loop_cfg.get("max_logprob_gap")
        self.max_logprob_gap = float(gap) if gap is not None else (1e-3 if run.dtype == torch.float32 else 5e-2)
        self.logprob_check_rows = int(loop_cfg.get("logprob_check_rows", 4))
        if self.logprob_check_rows < 1 or not self.max_logprob_gap > 0:
            raise ValueError(f"trainer.{s.loop_key}.logprob_check_rows must be >= 1 and max_logprob_gap > 0, got "
                             f"{self.logprob_check_rows} and {self.max_logprob_gap}")
        data = cfg.model.data
        max_prompt = max_len - int(s.length["max_length"])
        chat = bool(data.get("apply_chat_template", False))  # model.data.apply_chat_template
        self.prompts = PromptDataset(data.train_ds.file_path, run.tokenizer, max_prompt, apply_chat_template=chat)
        self.val_prompts = (PromptDataset(data.validation_ds.file_path, run.tokenizer, max_prompt, apply_chat_template=chat)
                            if data.validation_ds.file_path else None)
        self.sampler = DistributedResumableSampler(len(self.prompts), s.prompts_per_step, run.layout.dp_rank, dp,
                                                   seed=seed)
        if run.resume_state.get("sampler"):
            self.sampler.load_state_dict(run.resume_state["sampler"])
        self.batches = endless(self.sampler)
        self.run_id = run.resume_state.get("run_id") or hashlib.sha1(
            f"{Path(run.log_dir).resolve()}:{time.time()}".encode()).hexdigest()[:12]
        self.is_caller = run.layout.tp_rank == 0  # one caller of remote scorers per data-parallel replica
        self.algorithm: Algorithm = algorithm_factory(self)

    def export_policy_weights(self, model, directory) -> None:
        """The policy's current weights as a Hugging Face checkpoint (what an external engine such
        as TensorRT-LLM builds from). Collective over the model-parallel ranks."""
        from aligner.models.hf import convert

        tokenizer_dir = self.cfg.model.tokenizer.model
        convert.save_hf(model, self.run.model_config, directory,
                        tokenizer_dir=tokenizer_dir if Path(str(tokenizer_dir)).is_dir() else None)

    # -- generation and scoring
    def stream_keys(self, rows: list[tuple[int, int]], first_prompt: int, fixed_seed: bool, seed: int | None,
                    round_: int) -> list[int]:
        """One random stream per row, keyed by what the row *is*, never by where it runs: the
        prompt's index in the step's global batch (``first_prompt`` + its position here), the
        sample's index among that prompt's samples, the step and the generation round. The same
        global batch therefore gets the same random draws at any data-parallel, tensor-parallel
        or micro-batch layout (and the same samples up to floating-point near-ties of the
        logits). fixed_seed (validation): the step is left out, so every evaluation draws the
        same samples."""
        base = (VALIDATION_STREAM, seed or 0) if fixed_seed else (int(self.cfg.model.seed), self.run.step, round_)
        sample_of, keys = {}, []
        for local_prompt, _ in rows:  # rows hold each prompt's samples consecutively
            sample = sample_of[local_prompt] = sample_of.get(local_prompt, -1) + 1
            keys.append(stream_key(*base, first_prompt + local_prompt, sample))
        return keys

    @torch.no_grad()
    def generate(self, prompt_indices: list[int], dataset: PromptDataset, params: SamplingParams,
                 samples_per_prompt: int = 1, fixed_seed: bool = False, round_: int = 0,
                 first_prompt: int | None = None) -> Rollouts:
        """n samples of each prompt, consecutive; every micro-batch goes to the scorer at once.
        fixed_seed: the same draws at every evaluation (validation). first_prompt: the global
        index of prompt_indices[0] (default: this rank's slice of an evenly split global batch)."""
        micro = self.settings.rollout_micro_batch_size
        rows = [(g, i) for g, i in enumerate(prompt_indices) for _ in range(samples_per_prompt)]
        if first_prompt is None:  # where the prompt sampler's slice for this rank starts
            first_prompt = self.run.layout.dp_rank * self.sampler.micro_size
        keys = self.stream_keys(rows, first_prompt, fixed_seed, params.seed, round_)
        outputs, handles, texts = [], [], []
        scorer = self.algorithm.scorer
        tokenizer = self.run.tokenizer
        for start in range(0, len(rows), micro):
            part = rows[start:start + micro]
            items = [dataset[i] for _, i in part]
            batch = collate_prompts(items, tokenizer.pad_id)
            # params.seed still seeds engines that draw their own streams (TensorRT-LLM)
            seeded = dataclasses.replace(params, seed=keys[start])
            out = self.backend.generate(batch["prompt_tokens"], batch["prompt_lengths"], seeded,
                                        row_keys=keys[start:start + micro])
            responses = [tokenizer.decode(out.tokens[r, out.prompt_lengths[r]:out.sequence_lengths[r]].tolist(),
                                          skip_special_tokens=True) for r in range(out.tokens.shape[0])]
            outputs.append((out, torch.tensor([g for g, _ in part]), torch.tensor([i for _, i in part])))
            texts.append((batch["text"], responses, [it.get("fields", {}) for it in items]))
            if self.is_caller:
                handles.append(scorer.submit(Chunk(out.tokens, out.sequence_lengths, *texts[-1])))
        width = max(o.tokens.shape[1] for o, _, _ in outputs)
        pad = tokenizer.pad_id
        lengths = torch.cat([o.sequence_lengths for o, _, _ in outputs])
        prompt_lengths = torch.cat([o.prompt_lengths for o, _, _ in outputs])
        rollouts = Rollouts(
            tokens=torch.cat([pad_columns(o.tokens, width, pad) for o, _, _ in outputs]),
            lengths=lengths, prompt_lengths=prompt_lengths, is_end=torch.cat([o.is_end for o, _, _ in outputs]),
            mask=response_mask(prompt_lengths, lengths, width),
            generator_logprobs=torch.cat([pad_columns(o.generator_logprobs, width) for o, _, _ in outputs]),
            group=torch.cat([g for _, g, _ in outputs]), prompt_index=torch.cat([i for _, _, i in outputs]),
            prompts=[p for t in texts for p in t[0]], responses=[r for t in texts for r in t[1]],
            fields=[f for t in texts for f in t[2]])
        rollouts.pending = handles
        return rollouts

    def collect_scores(self, rollouts: Rollouts) -> None:
        """Rewards, validity and (if the scorer has them) values, the same on every TP rank."""
        if rollouts.rewards is not None:
            return
        scorer = self.algorithm.scorer
        n, width = rollouts.tokens.shape
        scores = scorer.collect(rollouts.pending, rollouts) if self.is_caller else None
        rollouts.pending = None
        rollouts.rewards = broadcast_tensor_parallel(None if scores is None else scores.rewards.float(), (n,),
                                                     torch.float32)
        valid = broadcast_tensor_parallel(None if scores is None else scores.valid.to(torch.uint8), (n,), torch.uint8)
        rollouts.valid = valid.bool()
        if scorer.provides_values:
            rollouts.values = broadcast_tensor_parallel(None if scores is None else scores.values.float(), (n, width),
                                                        torch.float32)
        names = list(scorer.metric_names)
        if names:
            counts = torch.tensor([scores.metrics.get(k, 0.0) for k in names]) if scores is not None else None
            counts = broadcast_tensor_parallel(counts, (len(names),), torch.float32)
            rollouts.score_metrics = dict(zip(names, counts.tolist()))

    def sample_step_batch(self, round_: int = 0) -> Rollouts:
        """The next prompts of the sampler, ``samples_per_prompt`` samples each."""
        return self.generate(next(self.batches), self.prompts, self.sampling, self.settings.samples_per_prompt,
                             round_=round_)

    def concat(self, parts: list[Rollouts]) -> Rollouts:
        return concat_rollouts(parts, self.run.tokenizer.pad_id)

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        size = self.settings.forward_micro_batch_size
        labels = rollouts.labels
        micro = [{"tokens": rollouts.tokens[i:i + size], "labels": labels[i:i + size], "mask": rollouts.mask[i:i + size]}
                 for i in range(0, len(rollouts), size)]
        records = collect_forward(self.run.model, TokenLogProbs(), micro)
        return torch.cat([r["logprobs"] for r in records])

    def old_logprobs(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy's log-probs of its own samples before the update (PPO's "old" log-probs),
        and the guard's metrics.

        trainer.<loop>.recompute_logprobs=true: a forward pass over every row. false (the
        default): the sampler already computed them from the same weights (raw logits), so they
        are reused once a forward pass over the first ``logprob_check_rows`` rows of every rank
        agrees with them: a masked mean |gap| above ``max_logprob_gap`` anywhere (a stale engine,
        a precision mismatch) recomputes every row instead. The decision is the same on all ranks."""
        if self.recompute_logprobs:
            logprobs = self.logprobs(rollouts)
            return logprobs, {**logprob_gap(rollouts, logprobs)[1], "logprobs_recomputed": 1.0}
        checked = rollouts.select(torch.arange(min(self.logprob_check_rows, len(rollouts))))
        own_gap, guard = logprob_gap(checked, self.logprobs(checked))
        # each rank's own gap (not the data-parallel mean): one stale rank must not be diluted
        worst = max_over_world(own_gap)
        if not worst <= self.max_logprob_gap:  # NaN too
            log.warning("generator/trainer log-prob gap %.3g > trainer.%s.max_logprob_gap=%.3g: recomputing this "
                        "step's old log-probs", worst, self.settings.loop_key, self.max_logprob_gap)
            logprobs = self.logprobs(rollouts)
            return logprobs, {**logprob_gap(rollouts, logprobs)[1], "logprobs_recomputed": 1.0}
        return rollouts.generator_logprobs * rollouts.mask, {**guard, "logprobs_recomputed": 0.0}

    # -- the policy update
    def update(self, rollouts: Rollouts, signal: PolicySignal) -> list[dict[str, float]]:
        """Epochs × mini-batches; each rank shuffles its rows and takes the same number of
        mini-batches, so every optimizer step is one collective step on every rank."""
        u = self.settings.update
        data = {"tokens": rollouts.tokens, "labels": rollouts.labels, "policy_mask": signal.policy_mask,
                "old_logprobs": rollouts.logprobs, "advantages": signal.advantages}
        if u.kl_loss_coef:
            data["ref_logprobs"] = rollouts.ref_logprobs
        rows = len(rollouts)
        loss = PolicyLoss(u)
        generator = torch.Generator().manual_seed(int(self.cfg.model.seed) * 100_003 + self.run.step)
        results = []
        for _ in range(u.epochs):
            order = torch.randperm(rows, generator=generator)
            for rows_mb in order.tensor_split(self.mini_batches):
                weight = 1.0
                if len(rows_mb) == 0:  # fewer rows than mini-batches on this rank: a row that counts nothing
                    rows_mb, weight = order[:1], 0.0
                tokens_in = all_reduce_sum_dp((signal.policy_mask[rows_mb].sum() * weight).reshape(1).clone())
                if float(tokens_in) == 0:  # nothing to learn from anywhere: skip, don't divide by 0
                    continue
                mb = {k: v[rows_mb] for k, v in data.items()}
                mb["policy_mask"] = mb["policy_mask"] * weight
                micro = u.micro_batch_size
                batches = [{k: v[i:i + micro] for k, v in mb.items()} for i in range(0, len(rows_mb), micro)]
                results.append(train_step(self.run.model, self.run.optimizer, self.run.scheduler, loss, batches))
                fault_point("actor.update")
        return results

    # -- one step
    def step(self) -> dict[str, float]:
        """One full step (rollouts, scores, advantages, update); returns its metrics. Does not
        log, validate or save: ``train`` does."""
        run, algo = self.run, self.algorithm
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        if self.offloader:
            self.offloader.offload()
        with timed(timings, "generate"):
            fault_point("actor.generate")
            rollouts = algo.rollout(self)
        with timed(timings, "logprobs"):
            rollouts.logprobs, guard = self.old_logprobs(rollouts)
        if self.reference is not None:
            with timed(timings, "ref_logprobs"):
                with self.reference.swapped_in(run.model):
                    rollouts.ref_logprobs = self.logprobs(rollouts)
        else:
            rollouts.ref_logprobs = rollouts.logprobs
        metrics: dict[str, float] = {f"rollout/{k}": v for k, v in guard.items()}
        with timed(timings, "score_wait"):
            metrics.update(algo.before_scores(self))
            self.collect_scores(rollouts)
        signal = algo.advantages(self, rollouts)
        metrics.update({f"rollout/{k}": v for k, v in self.rollout_metrics(rollouts, signal).items()})
        algo.after_advantages(self, rollouts, signal)
        if self.offloader:
            self.offloader.restore()
        if self.unload_engine_train:  # trt_llm.unload_engine_train: the engine's memory goes to training
            self.backend.unload()
        with timed(timings, "actor_train"):
            if algo.trains_policy(run.step):
                updates = self.update(rollouts, signal)
                metrics.update({f"train/{k}": v for k, v in average_updates(updates).items()})
                metrics["train/updates"] = float(len(updates))
        metrics.update(algo.after_update(self))
        self.backend.refit(run.model)
        run.step += 1
        elapsed = time.perf_counter() - step_start
        generated = float(all_reduce_sum_dp(rollouts.response_lengths.sum().float().reshape(1)))
        timings["timing/step_s"] = elapsed
        metrics.update(timings)
        metrics["throughput/generated_tokens_per_s"] = generated / max(timings["timing/generate_s"], 1e-9)
        metrics["throughput/samples_per_s"] = self.rollouts_per_step / elapsed
        return metrics

    def rollout_metrics(self, rollouts: Rollouts, signal: PolicySignal) -> dict[str, float]:
        mask = rollouts.mask
        n = float(len(rollouts))
        tokens = float(mask.sum())
        out = {
            "reward_mean": mean_over_dp(float(rollouts.rewards.mean()), n),
            "kl_per_token": mean_over_dp(float(masked_mean(rollouts.logprobs - rollouts.ref_logprobs, mask)), tokens),
            "response_length": mean_over_dp(float(rollouts.response_lengths.float().mean()), n),
            "is_end_fraction": mean_over_dp(float(rollouts.is_end.float().mean()), n),
            "advantage_mean": mean_over_dp(float(masked_mean(signal.advantages, mask)), tokens),
            "samples": float(all_reduce_sum_dp(torch.tensor([n]))),
        }
        for name, count in rollouts.score_metrics.items():
            out[name] = float(all_reduce_sum_dp(torch.tensor([count])))
        out.update(signal.metrics)
        return out

    # -- validation, checkpoints, the loop
    def validate(self) -> dict[str, float]:
        """Rollouts (greedy, or sampled with a fixed seed) on the first trainer.<loop>.val_prompts
        validation prompts, scored; the samples go to samples/val_step_N.jsonl."""
        run = self.run
        if self.val_prompts is None:
            return {}
        count = min(int(self.cfg.trainer[self.settings.loop_key].val_prompts), len(self.val_prompts))
        dp, rank = run.layout.data_parallel, run.layout.dp_rank
        per_rank = max(count // dp, 1)
        indices = list(range(rank * per_rank, min((rank + 1) * per_rank, len(self.val_prompts))))
        seeded = dataclasses.replace(self.val_sampling, seed=int(self.cfg.model.seed) + 7)
        rollouts = self.generate(indices, self.val_prompts, seeded, fixed_seed=True,
                                 first_prompt=indices[0] if indices else 0)
        self.collect_scores(rollouts)
        n = float(len(indices))
        metrics = {
            "val/reward_mean": mean_over_dp(float(rollouts.rewards.mean()), n),
            "val/response_length": mean_over_dp(float(rollouts.response_lengths.float().mean()), n),
        }
        run.metrics.log(run.step, metrics)
        if run.is_rank_zero:
            out = run.log_dir / "samples"
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"val_step_{run.step:07d}.jsonl", "w") as handle:
                for i, idx in enumerate(indices):
                    handle.write(json.dumps({"prompt": self.val_prompts[idx]["text"], "response": rollouts.responses[i],
                                             "reward": float(rollouts.rewards[i])}) + "\n")
            log.info("step %d validation: reward=%.4f length=%.1f", run.step, metrics["val/reward_mean"],
                     metrics["val/response_length"])
        return metrics

    def save(self) -> None:
        """The algorithm's side first (PPO: the critic, same step id), then the actor, which records it."""
        extra = self.algorithm.checkpoint_state(self)
        self.run.save_checkpoint({"sampler": self.sampler.state_dict(), "run_id": self.run_id, **extra})

    def train(self) -> dict:
        run, algo = self.run, self.algorithm
        loop = self.cfg.trainer[self.settings.loop_key]
        from tqdm.auto import tqdm

        try:
            algo.resumed(self)
            val_every, save_every = int(loop.val_check_interval or 0), int(loop.save_interval or 0)
            if run.step == 0 and val_every:
                self.validate()
            bar = tqdm(total=run.max_steps, initial=run.step, disable=not run.is_rank_zero,
                       desc=self.settings.loop_key, dynamic_ncols=True)
            while run.step < run.max_steps:
                metrics = self.step()
                run.metrics.log(run.step, metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}")
                if val_every and run.step % val_every == 0:
                    self.validate()
                if save_every and run.step % save_every == 0 and run.step < run.max_steps:
                    self.save()
            bar.close()
            if val_every and run.step % val_every != 0:
                self.validate()
            self.save()
            if run.is_rank_zero and self.settings.plot_keys:
                plot_curves(run.metrics.history, run.log_dir / "curves.png", list(self.settings.plot_keys),
                            title=self.settings.title)
            return {k: v[-1][1] for k, v in run.metrics.history.items() if v}
        finally:
            algo.close()
            run.finish()


def _plain(node) -> Any:
    from aligner.training.config_check import to_plain

    return to_plain(node) if node is not None else None
