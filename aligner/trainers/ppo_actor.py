"""PPO on the rollout engine: what is PPO's own.

The engine (aligner/rollout/engine.py) generates, computes actor and reference log-probs, runs
the policy update and owns validation and checkpoints. PPO adds:
  * the remote critic + reward-model server as the scorer (values and rewards per rollout,
    ``infer`` fired per micro-batch as soon as it is generated);
  * KL-shaped token rewards, GAE and globally whitened advantages (aligner/objectives/ppo.py);
  * the critic's update: one sequenced ``train`` request per step (idempotency key = run id +
    step), fired before the policy update and collected later (``CriticSync``);
  * tied checkpoints: the critic saves first with the same step id, the actor records the pair,
    and a resumed actor checks that its critic is at the same step.

NeMo-Aligner's config keys (conf/gpt_ppo_actor.yaml) map onto the engine's settings in
``engine_settings``.
"""
from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from aligner.distributed.collectives import all_gather_rows
from aligner.distributed.setup import all_reduce_sum_dp
from aligner.objectives.masked import masked_global_mean_var, masked_mean, whiten_with
from aligner.objectives.ppo import generalized_advantage_estimation, shape_rewards
from aligner.rollout.batch import Rollouts
from aligner.rollout.engine import EngineSettings, PolicySignal, RolloutEngine, UpdateSettings, mean_over_dp
from aligner.rollout.scorers import RemoteCriticScorer
from aligner.serving.client import CriticClient, CriticRequestError, CriticServerError
from aligner.training.config_check import to_plain

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


def engine_settings(cfg: DictConfig) -> EngineSettings:
    """The engine's settings from NeMo-Aligner's PPO keys."""
    ppo, trainer = cfg.model.ppo, cfg.trainer.ppo
    return EngineSettings(
        loop_key="ppo", prompts_per_step=int(ppo.num_rollout_samples), samples_per_prompt=1,
        rollout_micro_batch_size=int(ppo.rollout_micro_batch_size),
        forward_micro_batch_size=int(ppo.forward_micro_batch_size),
        offload_adam_states=bool(ppo.offload_adam_states), offload_device=str(ppo.offload_device),
        sampling=to_plain(ppo.sampling_params), length=to_plain(ppo.length_params),
        val_greedy=bool(trainer.val_greedy),
        update=UpdateSettings(epochs=int(trainer.ppo_epochs), mini_batch_size=int(cfg.model.global_batch_size),
                              micro_batch_size=int(cfg.model.micro_batch_size), clip_ratio_low=float(ppo.ratio_eps),
                              entropy_coef=float(ppo.entropy_bonus)),
        plot_keys=("rollout/reward_mean", "rollout/kl", "val/reward_mean", "train/entropy", "train/clip_fraction",
                   "critic/value_loss", "rollout/response_length", "rollout/generator_logprob_abs_gap"),
        title="PPO")


def critic_client(cfg: DictConfig, endpoint) -> CriticClient:
    remote = cfg.remote_critic_rm
    token = remote.auth_token or os.environ.get("ALIGNER_CRITIC_TOKEN")
    return CriticClient(str(endpoint.ip), int(endpoint.port), token=token,
                        request_timeout_s=float(remote.request_timeout_s),
                        total_timeout_s=float(remote.total_timeout_s))


class PPO:
    """PPO's part of each step (see the module docstring); plugged into a RolloutEngine."""

    def __init__(self, engine: RolloutEngine):
        cfg = engine.cfg
        self.cfg = cfg
        remote = cfg.remote_critic_rm
        self.kl_coef = float(cfg.trainer.ppo.initial_policy_kl_penalty)
        combined = bool(remote.combine_rm_and_critic_server)
        self.critic = critic_client(cfg, remote.critic) if engine.is_caller else None
        reward_model = critic_client(cfg, remote.reward_model) if engine.is_caller and not combined else None
        self.reward_model = reward_model
        self.scorer = RemoteCriticScorer(self.critic, reward_model)
        self.endpoint = f"{remote.critic.ip}:{remote.critic.port}"
        self.critic_sync = None
        if engine.is_caller and engine.run.layout.dp_rank == 0:
            self.critic_sync = CriticSync(self.critic, engine.run_id, self.endpoint, float(remote.total_timeout_s))
            self.critic_sync.saved_step = engine.run.step

    def rollout(self, engine: RolloutEngine) -> Rollouts:
        return engine.sample_step_batch()

    def before_scores(self, engine: RolloutEngine) -> dict[str, float]:
        """The previous step's critic update, collected while this step's infers are queued behind it."""
        return {f"critic/{k}": v for k, v in self.critic_sync.wait().items()} if self.critic_sync else {}

    def advantages(self, engine: RolloutEngine, rollouts: Rollouts) -> PolicySignal:
        ppo = self.cfg.trainer.ppo
        mask = rollouts.mask
        token_rewards, kl = shape_rewards(rollouts.rewards, rollouts.logprobs, rollouts.ref_logprobs, mask,
                                          self.kl_coef, bool(ppo.use_absolute_kl))
        adv, returns = generalized_advantage_estimation(token_rewards, rollouts.values, mask,
                                                        float(ppo.discount_factor), float(ppo.gae_lambda))
        if ppo.normalize_advantages:
            mean, var = masked_global_mean_var(adv, mask, all_reduce_sum=all_reduce_sum_dp)
            adv = whiten_with(adv, mask, mean, var)
        self.returns = returns
        policy_mask = mask * (rollouts.is_end.float().unsqueeze(1) if self.cfg.model.ppo.use_is_end_mask else 1.0)
        n, tokens = float(len(rollouts)), float(mask.sum())
        metrics = {"kl": mean_over_dp(float((kl * mask).sum() / max(n, 1)), n),  # per sequence
                   "value_mean": mean_over_dp(float(masked_mean(rollouts.values, mask)), tokens)}
        return PolicySignal(adv, policy_mask, metrics)

    def after_advantages(self, engine: RolloutEngine, rollouts: Rollouts, signal: PolicySignal) -> None:
        """The critic learns from every rollout of the step (all data-parallel ranks); not awaited here."""
        request = {"tokens": rollouts.tokens, "lengths": rollouts.lengths, "returns": self.returns.float(),
                   "prev_values": rollouts.values.float(), "mask": rollouts.mask.float()}
        request = {k: all_gather_rows(v) for k, v in request.items()}
        if self.critic_sync is not None:
            self.critic_sync.send(engine.run.step + 1, request)

    def trains_policy(self, step: int) -> bool:
        return step >= int(self.cfg.trainer.ppo.critic_warmup_steps)

    def after_update(self, engine: RolloutEngine) -> dict[str, float]:
        if self.critic_sync is None or not self.cfg.trainer.ppo.wait_for_critic_each_step:
            return {}
        return {f"critic/{k}": v for k, v in self.critic_sync.wait().items()}

    def checkpoint_state(self, engine: RolloutEngine) -> dict:
        """Critic first (same step id, holding exactly steps 1..step), then the actor records the pair."""
        step = engine.run.step
        info = self.critic_sync.save(step) if self.critic_sync is not None else {}
        return {"critic": {"step": step, **({"path": str(info.get("path"))} if info else {})}}

    def resumed(self, engine: RolloutEngine) -> None:
        """On resume the critic must hold exactly the actor checkpoint's steps. A critic that went
        on past it (the actor died after the critic trained or saved later steps) is rewound to
        its own checkpoint of that step, which the tied save left in its directory. Every rank
        waits for that before its first infer."""
        if self.critic is not None:
            self._pair_with_critic(engine)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _pair_with_critic(self, engine: RolloutEngine) -> None:
        self.critic.wait_until_ready(float(self.cfg.remote_critic_rm.total_timeout_s))
        handler = self.critic.metrics().get("handler", {})
        critic_step, trained = handler.get("checkpoint_step"), handler.get("trained_step")
        step = engine.run.step
        if step == 0:
            if trained:
                raise CheckpointPairError(
                    f"the actor starts from scratch (no checkpoint in {engine.run.checkpoint_dir}) but the critic "
                    f"server at {self.endpoint} already holds {trained} PPO step(s): restart the critic from "
                    f"scratch too (a new exp_manager.explicit_log_dir), or resume the actor from its checkpoint")
            return
        if critic_step == step and trained == step:
            return
        if self.critic_sync is None:  # another data-parallel caller: rank 0's rewind is enough
            return
        try:
            info = self.critic.restore(step)
        except (CriticRequestError, CriticServerError) as exc:
            raise CheckpointPairError(
                f"the actor resumed from PPO step {step} (in {engine.run.checkpoint_dir}) but the critic server at "
                f"{self.endpoint} is at step {trained} (checkpoint step {critic_step}) and could not rewind to its "
                f"checkpoint of step {step}: {exc.message}. Restart both sides from a tied checkpoint pair.") from None
        log.warning("the critic was at PPO step %s (checkpoint step %s); rewound it to its tied checkpoint of step "
                    "%d (%s)", trained, critic_step, step, info.get("path"))

    def close(self) -> None:
        for client in (self.critic, self.reward_model):
            if client is not None:
                client.close()


def build_engine(cfg: DictConfig, schema) -> RolloutEngine:
    return RolloutEngine(cfg, schema, engine_settings(cfg), PPO)


def train(cfg: DictConfig, schema) -> dict:
    return build_engine(cfg, schema).train()
