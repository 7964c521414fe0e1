"""PPO actor: generate, score with the remote critic + reward model, update the policy.

One step, as the loop below reads:
  offload Adam states → generate rollouts micro-batch by micro-batch, firing a critic/RM
  `infer` request for each as soon as it exists → actor log-probs → reference log-probs (the
  initial weights parked in host memory, swapped in) → collect values and rewards → KL-shaped
  rewards, GAE, globally normalised advantages → fire the critic `train` (idempotency key =
  run id + step) → restore Adam states → PPO epochs × mini-batches → metrics.

The maths lives in aligner/objectives/ppo.py; this module is the plumbing around it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from aligner.data.collate import collate_prompts, shift_left
from aligner.data.prompts import PromptDataset
from aligner.data.samplers import DistributedResumableSampler
from aligner.distributed.setup import all_reduce_sum_dp
from aligner.generation.backend import build_backend
from aligner.generation.params import SamplingParams
from aligner.models.gpt import position_ids_for
from aligner.objectives.logprobs import entropy_from_logits, token_logprobs_from_logits
from aligner.objectives.masked import masked_global_mean_var, masked_mean, whiten_with
from aligner.objectives.ppo import (
    approx_kl_k3,
    entropy_bonus,
    generalized_advantage_estimation,
    ppo_policy_loss,
    shape_rewards,
)
from aligner.faults import fault_point
from aligner.serving.client import CriticClient, CriticRequestError
from aligner.training.config_check import to_plain
from aligner.training.loop import endless
from aligner.training.offload import OptimizerStateOffloader
from aligner.training.plots import plot_curves
from aligner.training.reference import park_initial_weights
from aligner.training.run import Run
from aligner.training.step import collect_forward, mean_metric, train_step

log = logging.getLogger("aligner.ppo")


class CheckpointPairError(RuntimeError):
    """The actor's and the critic's checkpoints are not from the same PPO step."""


class CriticStateLost(RuntimeError):
    """The critic lost updates that the actor no longer holds to re-send."""


class CriticSync:
    """The actor's side of exactly-once critic training: every PPO step's critic update is in
    the critic's state once, in order, and a tied checkpoint pair holds the same steps.

    Train requests are sequenced (``step`` N is applied only on a state at N-1; the critic
    answers 409 otherwise) and kept here until a tied checkpoint covers them. After a critic
    restart (it resumes from its last checkpoint) the actor re-sends what the critic lacks,
    under the same idempotency keys; a checkpoint is requested only once the critic's state is
    at the step it will be labelled with (the critic refuses any other label with 409).
    """

    def __init__(self, client: CriticClient, run_id: str, endpoint: str, total_timeout_s: float):
        self.client, self.run_id, self.endpoint = client, run_id, endpoint
        self.total_timeout_s = total_timeout_s
        self.unsaved: dict[int, dict[str, torch.Tensor]] = {}  # step -> train request since the last save
        self.pending = None  # (step, Future) of the last train request, not yet awaited
        self.saved_step = 0

    def key(self, step: int) -> str:
        return f"{self.run_id}:critic-train:{step}"

    def send(self, step: int, request: dict[str, torch.Tensor]) -> None:
        """Fire step's update without waiting (collect it with wait())."""
        self.unsaved[step] = request
        self.pending = (step, self.client.train_async(request, idempotency_key=self.key(step), step=step))

    def wait(self) -> dict[str, float]:
        """Metrics of the last update sent; re-sends what a restarted critic lacks."""
        if self.pending is None:
            return {}
        step, future = self.pending
        self.pending = None
        try:
            return future.result()
        except CriticRequestError as exc:
            if exc.status != 409:
                raise
            log.warning("critic refused step %d's update (%s): re-sending what it lacks", step, exc.message)
            return self.catch_up(step)

    def critic_step(self) -> int:
        self.client.wait_until_ready(self.total_timeout_s)
        return int(self.client.metrics()["handler"]["trained_step"])

    def catch_up(self, step: int) -> dict[str, float]:
        """Bring the critic's state to ``step`` by re-sending the held requests it lacks."""
        at = self.critic_step()
        if at > step:
            raise CheckpointPairError(f"the critic server at {self.endpoint} is at PPO step {at}, ahead of the "
                                      f"actor's step {step}: it was not restarted from the actor's tied checkpoint")
        missing = list(range(at + 1, step + 1))
        lost = [s for s in missing if s not in self.unsaved]
        if lost:
            raise CriticStateLost(
                f"the critic server at {self.endpoint} is at PPO step {at} but the actor is at step {step}: the "
                f"updates of steps {lost[0]}..{lost[-1]} are lost (the critic resumed from an older checkpoint "
                f"than the last tied one, step {self.saved_step}). Restart both from the tied checkpoint pair of "
                f"step {self.saved_step} (exp_manager.resume_if_exists=true on both sides).")
        metrics: dict[str, float] = {}
        for s in missing:
            log.warning("re-sending the critic update of PPO step %d (the critic restarted at step %d)", s, at)
            metrics = self.client.train(self.unsaved[s], idempotency_key=self.key(s), step=s)
        return metrics

    def save(self, step: int, attempts: int = 3) -> dict:
        """A critic checkpoint labelled ``step`` that holds exactly the updates of steps 1..step."""
        self.wait()
        for attempt in range(attempts):
            self.catch_up(step)
            try:
                info = self.client.save(step, idempotency_key=f"{self.run_id}:critic-save:{step}")
            except CriticRequestError as exc:  # restarted again between catch-up and save
                if exc.status != 409 or attempt == attempts - 1:
                    raise
                continue
            self.unsaved.clear()
            self.saved_step = step
            return info
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- model passes
class TokenLogProbs:
    """Forward-only: per-token log-probs [B,S] (index t = log p(token t+1)) from gathered logits."""

    metric_names = ()

    def forward(self, model, batch):
        tokens = batch["tokens"]
        logits = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)

        def loss_fn(logits):
            logprobs = token_logprobs_from_logits(logits.float(), batch["labels"])
            return torch.zeros(()), torch.tensor(1), {"logprobs": logprobs.detach()}

        return logits, loss_fn


class PPOPolicyLoss:
    """Clipped-ratio policy loss minus an entropy bonus, summed over response tokens."""

    metric_names = ("policy_loss", "clip_fraction", "approx_kl", "entropy", "ratio_mean")

    def __init__(self, ratio_eps: float, entropy_coef: float):
        self.ratio_eps, self.entropy_coef = ratio_eps, entropy_coef

    def forward(self, model, batch):
        tokens = batch["tokens"]
        logits = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)

        def loss_fn(logits):
            mask = batch["policy_mask"]
            logprobs = token_logprobs_from_logits(logits.float(), batch["labels"])
            loss, metrics = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                            self.ratio_eps)
            entropy = entropy_bonus(entropy_from_logits(logits.float()), mask)
            total = loss - self.entropy_coef * entropy
            count = mask.sum()
            sums = {"policy_loss": mean_metric(loss, count), "entropy": mean_metric(entropy, count),
                    **{k: mean_metric(metrics[k], count) for k in ("clip_fraction", "approx_kl", "ratio_mean")}}
            return total * count, count.round().to(torch.int), sums

        return logits, loss_fn


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """One step's experience on this data-parallel rank, padded to a common length S."""

    tokens: torch.Tensor  # [N,S]
    lengths: torch.Tensor  # [N] prompt + response
    prompt_lengths: torch.Tensor  # [N]
    is_end: torch.Tensor  # [N] bool
    mask: torch.Tensor  # [N,S] float: position t predicts a response token
    generator_logprobs: torch.Tensor  # [N,S]
    texts: list[str] = field(default_factory=list)
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    infer_futures: list = field(default_factory=list)  # critic `infer` requests in flight
    reward_futures: list = field(default_factory=list)  # separate-RM requests in flight

    @property
    def labels(self) -> torch.Tensor:
        return shift_left(self.tokens, 0)


def _pad_to(tensor: torch.Tensor, length: int, value=0) -> torch.Tensor:
    if tensor.shape[1] >= length:
        return tensor[:, :length]
    pad = torch.full((tensor.shape[0], length - tensor.shape[1]), value, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[N,S] float: 1 where position t predicts a response token (P-1 <= t <= P+R-2)."""
    t = torch.arange(width).unsqueeze(0)
    return ((t + 1 >= prompt_lengths.unsqueeze(1)) & (t + 1 < lengths.unsqueeze(1))).float()


class PPOActor:
    def __init__(self, cfg: DictConfig, schema):
        ppo = cfg.model.ppo
        self.cfg = cfg
        self.rollouts_per_step = int(ppo.num_rollout_samples)
        self.mini_batch_size = int(cfg.model.global_batch_size)
        self.epochs = int(cfg.trainer.ppo.ppo_epochs)
        if self.rollouts_per_step % self.mini_batch_size:
            raise ValueError(f"model.ppo.num_rollout_samples={self.rollouts_per_step} must be a multiple of "
                             f"model.global_batch_size={self.mini_batch_size} (the PPO mini-batch)")
        updates_per_step = self.epochs * self.rollouts_per_step // self.mini_batch_size
        self.run = run = Run(cfg, "ppo", schema, optimizer_steps=int(cfg.trainer.ppo.max_steps) * updates_per_step)
        if run.layout.pipeline_parallel != 1:
            raise NotImplementedError("PPO generation needs model.pipeline_model_parallel_size=1")
        dp = run.layout.data_parallel
        if self.rollouts_per_step % (dp * int(ppo.rollout_micro_batch_size)):
            raise ValueError("model.ppo.num_rollout_samples must be a multiple of data-parallel size x "
                             "model.ppo.rollout_micro_batch_size")
        self.reference = park_initial_weights(run)  # before anything trains
        self.offloader = OptimizerStateOffloader(run.optimizer, ppo.offload_device) if ppo.offload_adam_states else None
        self.sampling = SamplingParams.from_config(to_plain(ppo.sampling_params), to_plain(ppo.length_params),
                                                   seed=int(cfg.model.seed))
        sampling = {k: v for k, v in to_plain(ppo.sampling_params).items() if k not in ("greedy", "use_greedy")}
        self.val_sampling = SamplingParams.from_config({**sampling, "greedy": bool(cfg.trainer.ppo.val_greedy)},
                                                       to_plain(ppo.length_params), seed=int(cfg.model.seed))
        max_len = int(cfg.model.encoder_seq_length)
        self.backend = build_backend(to_plain(cfg.trainer.ppo.trt_llm), run.model, eos_id=run.tokenizer.eos_id,
                                     pad_id=run.tokenizer.pad_id,
                                     max_batch_size=int(ppo.rollout_micro_batch_size),
                                     max_sequence_length=max_len, tokenizer=run.tokenizer,
                                     vocab_size=run.model_config.vocab_size)
        data = cfg.model.data
        max_prompt = max_len - int(ppo.length_params.max_length)
        self.prompts = PromptDataset(data.train_ds.file_path, run.tokenizer, max_prompt)
        self.val_prompts = (PromptDataset(data.validation_ds.file_path, run.tokenizer, max_prompt)
                            if data.validation_ds.file_path else None)
        self.sampler = DistributedResumableSampler(len(self.prompts), self.rollouts_per_step, run.layout.dp_rank, dp,
                                                   seed=int(cfg.model.seed))
        if run.resume_state.get("sampler"):
            self.sampler.load_state_dict(run.resume_state["sampler"])
        self.run_id = run.resume_state.get("run_id") or hashlib.sha1(
            f"{Path(run.log_dir).resolve()}:{time.time()}".encode()).hexdigest()[:12]
        self.is_caller = run.layout.tp_rank == 0  # one caller per data-parallel replica
        remote = cfg.remote_critic_rm
        self.combined = bool(remote.combine_rm_and_critic_server)
        self.critic = self._client(remote.critic) if self.is_caller else None
        self.reward_model = (self._client(remote.reward_model) if self.is_caller and not self.combined else None)
        endpoint = f"{remote.critic.ip}:{remote.critic.port}"
        self.critic_sync = (CriticSync(self.critic, self.run_id, endpoint, float(remote.total_timeout_s))
                            if self.is_caller and run.layout.dp_rank == 0 else None)
        if self.critic_sync is not None:
            self.critic_sync.saved_step = run.step

    def _client(self, endpoint) -> CriticClient:
        remote = self.cfg.remote_critic_rm
        import os

        token = remote.auth_token or os.environ.get("ALIGNER_CRITIC_TOKEN")
        return CriticClient(str(endpoint.ip), int(endpoint.port), token=token,
                            request_timeout_s=float(remote.request_timeout_s),
                            total_timeout_s=float(remote.total_timeout_s))

    # -- helpers over the model-parallel group: the caller talks HTTP, the others receive
    def _share(self, tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype)
        dist.broadcast(tensor, parallel_state.get_tensor_model_parallel_src_rank(), group=group)
        return tensor

    def check_critic_pairing(self) -> None:
        """On resume, the critic must be at the same PPO step as the actor's checkpoint."""
        if not self.is_caller:
            return
        self.critic.wait_until_ready(float(self.cfg.remote_critic_rm.total_timeout_s))
        critic_step = self.critic.metrics().get("handler", {}).get("checkpoint_step")
        if self.run.step == 0:
            return
        if critic_step != self.run.step:
            raise CheckpointPairError(
                f"the actor resumed from PPO step {self.run.step} (in {self.run.checkpoint_dir}) but the critic "
                f"server at {self.cfg.remote_critic_rm.critic.ip}:{self.cfg.remote_critic_rm.critic.port} is at "
                f"checkpoint step {critic_step}. Restart the critic with the checkpoint of step {self.run.step} "
                f"(the actor's trainer_state.json names it under 'critic'), or start both from scratch.")

    # -- one rollout phase
    def sampling_seed(self, micro_batch: int) -> int:
        """A different, reproducible random stream per step, micro-batch and data-parallel rank."""
        return (int(self.cfg.model.seed) * 1_000_003 + self.run.step * 10_007 + micro_batch * 101
                + self.run.layout.dp_rank) % (2 ** 62)

    @torch.no_grad()
    def generate(self, prompt_indices: list[int], dataset: PromptDataset, params: SamplingParams,
                 fixed_seed: bool = False) -> Rollouts:
        """fixed_seed: keep params.seed (validation: the same draws at every evaluation)."""
        import dataclasses

        micro = int(self.cfg.model.ppo.rollout_micro_batch_size)
        outputs, futures, reward_futures = [], [], []
        for start in range(0, len(prompt_indices), micro):
            batch = collate_prompts([dataset[i] for i in prompt_indices[start:start + micro]], self.run.tokenizer.pad_id)
            seeded = params if fixed_seed else dataclasses.replace(params, seed=self.sampling_seed(start // micro))
            out = self.backend.generate(batch["prompt_tokens"], batch["prompt_lengths"], seeded)
            outputs.append(out)
            if self.is_caller:  # fire now; collect after the log-prob passes
                futures.append(self.critic.infer_async(out.tokens, out.sequence_lengths))
                if self.reward_model is not None:
                    reward_futures.append(self.reward_model.infer_async(out.tokens, out.sequence_lengths))
        width = max(o.tokens.shape[1] for o in outputs)
        pad = self.run.tokenizer.pad_id
        tokens = torch.cat([_pad_to(o.tokens, width, pad) for o in outputs])
        lengths = torch.cat([o.sequence_lengths for o in outputs])
        prompt_lengths = torch.cat([o.prompt_lengths for o in outputs])
        gen_lp = torch.cat([_pad_to(o.generator_logprobs, width) for o in outputs])
        rollouts = Rollouts(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths,
                            is_end=torch.cat([o.is_end for o in outputs]),
                            mask=response_mask(prompt_lengths, lengths, width), generator_logprobs=gen_lp)
        rollouts.texts = [self.run.tokenizer.decode(tokens[i, prompt_lengths[i]:lengths[i]].tolist(),
                                                    skip_special_tokens=True) for i in range(tokens.shape[0])]
        rollouts.infer_futures, rollouts.reward_futures = futures, reward_futures
        return rollouts

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        size = int(self.cfg.model.ppo.forward_micro_batch_size)
        micro = [{"tokens": rollouts.tokens[i:i + size], "labels": rollouts.labels[i:i + size]}
                 for i in range(0, rollouts.tokens.shape[0], size)]
        records = collect_forward(self.run.model, TokenLogProbs(), micro)
        return torch.cat([r["logprobs"] for r in records])

    def collect_scores(self, rollouts: Rollouts) -> None:
        width = rollouts.tokens.shape[1]
        n = rollouts.tokens.shape[0]
        values = rewards = None
        if self.is_caller:
            results = [f.result() for f in rollouts.infer_futures]
            values = torch.cat([_pad_to(r["values"].float(), width) for r in results])
            source = [f.result() for f in rollouts.reward_futures] if self.reward_model is not None else results
            if any("rewards" not in r for r in source):
                raise RuntimeError("the critic server returned no rewards: start it with "
                                   "trainer.ppo.combine_rm_and_critic_server=True, or set "
                                   "remote_critic_rm.combine_rm_and_critic_server=False and run serve_reward_model.py")
            rewards = torch.cat([r["rewards"].float() for r in source])
        rollouts.values = self._share(values, (n, width), torch.float32)
        rollouts.rewards = self._share(rewards, (n,), torch.float32)

    # -- learning signal (pure maths from aligner.objectives)
    def advantages(self, rollouts: Rollouts, kl_coef: float) -> dict[str, torch.Tensor]:
        ppo = self.cfg.trainer.ppo
        token_rewards, kl = shape_rewards(rollouts.rewards, rollouts.logprobs, rollouts.ref_logprobs, rollouts.mask,
                                          kl_coef, bool(ppo.use_absolute_kl))
        adv, returns = generalized_advantage_estimation(token_rewards, rollouts.values, rollouts.mask,
                                                        float(ppo.discount_factor), float(ppo.gae_lambda))
        if ppo.normalize_advantages:
            mean, var = masked_global_mean_var(adv, rollouts.mask, all_reduce_sum=all_reduce_sum_dp)
            adv = whiten_with(adv, rollouts.mask, mean, var)
        return {"advantages": adv, "returns": returns, "kl": kl}

    def train_actor(self, rollouts: Rollouts, signal: dict, step: int) -> list[dict[str, float]]:
        ppo = self.cfg.model.ppo
        policy_mask = rollouts.mask * (rollouts.is_end.float().unsqueeze(1) if ppo.use_is_end_mask else 1.0)
        data = {"tokens": rollouts.tokens, "labels": rollouts.labels, "policy_mask": policy_mask,
                "old_logprobs": rollouts.logprobs, "advantages": signal["advantages"]}
        rows = rollouts.tokens.shape[0]
        per_rank = self.mini_batch_size // self.run.layout.data_parallel
        micro = int(self.cfg.model.micro_batch_size)
        loss = PPOPolicyLoss(float(ppo.ratio_eps), float(ppo.entropy_bonus))
        generator = torch.Generator().manual_seed(int(self.cfg.model.seed) * 100_003 + step)
        results = []
        for _ in range(self.epochs):
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows, per_rank):
                rows_mb = order[start:start + per_rank]
                tokens_in = all_reduce_sum_dp(policy_mask[rows_mb].sum().reshape(1).clone())
                if float(tokens_in) == 0:  # nothing to learn from (no response ended): skip, don't divide by 0
                    continue
                batches = [{k: v[rows_mb[i:i + micro]] for k, v in data.items()} for i in range(0, len(rows_mb), micro)]
                results.append(train_step(self.run.model, self.run.optimizer, self.run.scheduler, loss, batches))
                fault_point("actor.update")
        return results

    def critic_train_request(self, rollouts: Rollouts, signal: dict) -> dict[str, torch.Tensor]:
        return {"tokens": rollouts.tokens, "lengths": rollouts.lengths, "returns": signal["returns"].float(),
                "prev_values": rollouts.values.float(), "mask": rollouts.mask.float()}


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[f"timing/{name}_s"] = timings.get(f"timing/{name}_s", 0.0) + time.perf_counter() - start


def _gather_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [N, ...] tensor over data-parallel ranks (rows padded to a common width)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    if tensor.dim() == 2:
        width = torch.tensor([tensor.shape[1]])
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        tensor = _pad_to(tensor, int(width))
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _mean_over_dp(value: float, count: float) -> float:
    pair = all_reduce_sum_dp(torch.tensor([value * count, count], dtype=torch.float64))
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")


def rollout_metrics(rollouts: Rollouts, signal: dict) -> dict[str, float]:
    mask = rollouts.mask
    n = float(rollouts.tokens.shape[0])
    tokens = float(mask.sum())
    gap = masked_mean((rollouts.generator_logprobs - rollouts.logprobs).abs(), mask)
    return {
        "reward_mean": _mean_over_dp(float(rollouts.rewards.mean()), n),
        "kl": _mean_over_dp(float((signal["kl"] * mask).sum() / max(n, 1)), n),  # per sequence
        "kl_per_token": _mean_over_dp(float(masked_mean(rollouts.logprobs - rollouts.ref_logprobs, mask)), tokens),
        "response_length": _mean_over_dp(float((rollouts.lengths - rollouts.prompt_lengths).float().mean()), n),
        "is_end_fraction": _mean_over_dp(float(rollouts.is_end.float().mean()), n),
        "generator_logprob_abs_gap": _mean_over_dp(float(gap), tokens),
        "generator_kl_error": _mean_over_dp(float(approx_kl_k3(rollouts.generator_logprobs, rollouts.logprobs,
                                                                 mask)), tokens),
        "value_mean": _mean_over_dp(float(masked_mean(rollouts.values, mask)), tokens),
        "advantage_mean": _mean_over_dp(float(masked_mean(signal["advantages"], mask)), tokens),
    }


def _average(results: list[dict[str, float]]) -> dict[str, float]:
    if not results:
        return {}
    keys = results[0].keys()
    return {k: sum(r[k] for r in results) / len(results) for k in keys if not any(math.isnan(r[k]) for r in results)}


def train(cfg: DictConfig, schema) -> dict:
    actor = PPOActor(cfg, schema)
    run = actor.run
    ppo = cfg.trainer.ppo
    try:
        actor.check_critic_pairing()
        batches = endless(actor.sampler)
        kl_coef = float(ppo.initial_policy_kl_penalty)
        val_every, save_every = int(ppo.val_check_interval or 0), int(ppo.save_interval or 0)
        if run.step == 0 and val_every:
            validate(actor)
        bar = tqdm(total=run.max_steps, initial=run.step, disable=not run.is_rank_zero, desc="ppo", dynamic_ncols=True)
        while run.step < run.max_steps:
            timings: dict[str, float] = {}
            step_start = time.perf_counter()
            if actor.offloader:
                actor.offloader.offload()
            with _timed(timings, "generate"):
                fault_point("actor.generate")
                rollouts = actor.generate(next(batches), actor.prompts, actor.sampling)
            with _timed(timings, "logprobs"):
                rollouts.logprobs = actor.logprobs(rollouts)
            with _timed(timings, "ref_logprobs"):
                with actor.reference.swapped_in(run.model):
                    rollouts.ref_logprobs = actor.logprobs(rollouts)
            metrics: dict[str, float] = {}
            with _timed(timings, "critic_infer_wait"):
                if actor.critic_sync is not None:  # the previous step's critic update
                    metrics.update({f"critic/{k}": v for k, v in actor.critic_sync.wait().items()})
                actor.collect_scores(rollouts)
            signal = actor.advantages(rollouts, kl_coef)
            metrics.update({f"rollout/{k}": v for k, v in rollout_metrics(rollouts, signal).items()})
            # the critic learns from every rollout; its request is not awaited here
            request = {k: _gather_dp(v) for k, v in actor.critic_train_request(rollouts, signal).items()}
            if actor.critic_sync is not None:
                actor.critic_sync.send(run.step + 1, request)
            if actor.offloader:
                actor.offloader.restore()
            with _timed(timings, "actor_train"):
                if run.step >= int(ppo.critic_warmup_steps):
                    updates = actor.train_actor(rollouts, signal, run.step)
                    metrics.update({f"train/{k}": v for k, v in _average(updates).items()})
                    metrics["train/updates"] = float(len(updates))
            if actor.critic_sync is not None and ppo.wait_for_critic_each_step:
                with _timed(timings, "critic_train_wait"):
                    metrics.update({f"critic/{k}": v for k, v in actor.critic_sync.wait().items()})
            actor.backend.refit(run.model)
            run.step += 1
            elapsed = time.perf_counter() - step_start
            generated = float(all_reduce_sum_dp((rollouts.lengths - rollouts.prompt_lengths).sum().float().reshape(1)))
            timings["timing/step_s"] = elapsed
            metrics.update(timings)
            metrics["throughput/generated_tokens_per_s"] = generated / max(timings["timing/generate_s"], 1e-9)
            metrics["throughput/samples_per_s"] = actor.rollouts_per_step / elapsed
            run.metrics.log(run.step, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}", kl=f"{metrics['rollout/kl']:.3f}")
            if val_every and run.step % val_every == 0:
                validate(actor)
            if save_every and run.step % save_every == 0 and run.step < run.max_steps:
                save(actor)
        bar.close()
        if val_every and run.step % val_every != 0:
            validate(actor)
        save(actor)
        if run.is_rank_zero:
            plot_curves(run.metrics.history, run.log_dir / "curves.png",
                        ["rollout/reward_mean", "rollout/kl", "val/reward_mean", "train/entropy",
                         "train/clip_fraction", "critic/value_loss", "rollout/response_length",
                         "rollout/generator_logprob_abs_gap"], title="PPO")
        return {k: v[-1][1] for k, v in run.metrics.history.items() if v}
    finally:
        if actor.critic is not None:
            actor.critic.close()
        run.finish()


def validate(actor: PPOActor) -> dict[str, float]:
    """Rollouts (greedy, or sampled with a fixed seed) on a fixed slice of the validation prompts,
    scored by the reward model; the samples are written to samples/val_step_N.jsonl."""
    run = actor.run
    if actor.val_prompts is None:
        return {}
    count = min(int(actor.cfg.trainer.ppo.val_prompts), len(actor.val_prompts))
    dp, rank = run.layout.data_parallel, run.layout.dp_rank
    per_rank = max(count // dp, 1)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, len(actor.val_prompts))))
    import dataclasses

    seeded = dataclasses.replace(actor.val_sampling, seed=int(actor.cfg.model.seed) + 7 + run.layout.dp_rank)
    rollouts = actor.generate(indices, actor.val_prompts, seeded, fixed_seed=True)
    actor.collect_scores(rollouts)
    n = float(len(indices))
    metrics = {
        "val/reward_mean": _mean_over_dp(float(rollouts.rewards.mean()), n),
        "val/response_length": _mean_over_dp(float((rollouts.lengths - rollouts.prompt_lengths).float().mean()), n),
    }
    run.metrics.log(run.step, metrics)
    if run.is_rank_zero:
        out = run.log_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"val_step_{run.step:07d}.jsonl", "w") as handle:
            for i, idx in enumerate(indices):
                handle.write(json.dumps({"prompt": actor.val_prompts[idx]["text"], "response": rollouts.texts[i],
                                         "reward": float(rollouts.rewards[i])}) + "\n")
        log.info("step %d validation: reward=%.4f length=%.1f", run.step, metrics["val/reward_mean"],
                 metrics["val/response_length"])
    return metrics


def save(actor: PPOActor) -> None:
    """Critic first (same step id), then the actor, which records the pairing."""
    run = actor.run
    critic_info = {}
    if actor.critic_sync is not None:
        critic_info = actor.critic_sync.save(run.step)
    run.save_checkpoint({"sampler": actor.sampler.state_dict(), "run_id": actor.run_id,
                         "critic": {"step": run.step, **({"path": str(critic_info.get("path"))} if critic_info else {})}})
