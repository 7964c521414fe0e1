"""The critic-free family on the rollout engine: GRPO, Dr. GRPO, DAPO's pieces, RLOO, REINFORCE++
(with and without a group baseline) and ReMax.

What is theirs (the engine does the rest): several samples per prompt, rewards from Python
functions and/or a reward-model server, an advantage estimator instead of a critic, the KL to the
reference either inside the reward or as a loss term, and DAPO's dynamic sampling (groups whose
rewards are all equal teach nothing: drop them and sample more prompts) and overlong shaping.
Keys follow verl where NeMo-Aligner has none (conf/gpt_grpo.yaml says which).
"""
from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from aligner.distributed.setup import all_reduce_sum_dp
from aligner.objectives.advantages import (
    broadcast_to_tokens,
    check_num_generations,
    groups_with_distinct_rewards,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from aligner.objectives.kl import KL_ESTIMATORS, token_kl
from aligner.objectives.masked import masked_mean
from aligner.objectives.policy_loss import check_loss_agg_mode
from aligner.objectives.rewards import kl_shaped_token_rewards, overlong_reward_penalty
from aligner.rollout.batch import Rollouts
from aligner.rollout.engine import EngineSettings, PolicySignal, RolloutEngine, UpdateSettings, mean_over_dp
from aligner.rollout.scorers import FunctionScorer, RemoteRewardScorer, WeightedScorer
from aligner.serving.client import CriticClient
from aligner.training.config_check import ConfigError, to_plain

log = logging.getLogger("aligner.grpo")

# verl spells k3 "low_var_kl" and k2 "mse"
_KL_ALIASES = {"low_var_kl": "k3", "mse": "k2", "kl": "k1"}


def kl_estimator(name: str, key: str) -> str:
    name = _KL_ALIASES.get(str(name), str(name))
    if name not in KL_ESTIMATORS:
        raise ConfigError(f"{key}={name!r} is not one of {', '.join(KL_ESTIMATORS)} (or low_var_kl, mse)")
    return name


def engine_settings(cfg: DictConfig) -> EngineSettings:
    grpo, algo, trainer = cfg.model.grpo, cfg.algorithm, cfg.trainer.grpo
    n = int(grpo.num_generations)
    check_num_generations(str(algo.adv_estimator), n)
    check_loss_agg_mode(str(algo.loss_agg_mode))
    max_new = int(grpo.length_params.max_length)
    uses_reference = (bool(algo.use_kl_in_reward) and float(algo.kl_ctrl.kl_coef) != 0) or (
        bool(algo.use_kl_loss) and float(algo.kl_loss_coef) != 0)
    return EngineSettings(
        loop_key="grpo", prompts_per_step=int(grpo.num_prompts_per_step), samples_per_prompt=n,
        rollout_micro_batch_size=int(grpo.rollout_micro_batch_size),
        forward_micro_batch_size=int(grpo.forward_micro_batch_size),
        offload_adam_states=bool(grpo.offload_adam_states), offload_device=str(grpo.offload_device),
        sampling=to_plain(grpo.sampling_params), length=to_plain(grpo.length_params),
        val_greedy=bool(trainer.val_greedy),
        update=UpdateSettings(
            epochs=int(trainer.ppo_epochs), mini_batch_size=int(cfg.model.global_batch_size),
            micro_batch_size=int(cfg.model.micro_batch_size), clip_ratio_low=float(algo.clip_ratio_low),
            clip_ratio_high=None if algo.clip_ratio_high is None else float(algo.clip_ratio_high),
            clip_ratio_c=None if algo.clip_ratio_c is None else float(algo.clip_ratio_c),
            entropy_coef=float(algo.entropy_coeff), loss_agg_mode=str(algo.loss_agg_mode),
            loss_scale_factor=float(max_new),
            kl_loss_coef=float(algo.kl_loss_coef) if algo.use_kl_loss else 0.0,
            kl_loss_type=kl_estimator(algo.kl_loss_type, "algorithm.kl_loss_type")),
        needs_reference=uses_reference,
        plot_keys=("rollout/reward_mean", "val/reward_mean", "rollout/kl_per_token", "train/entropy",
                   "train/clip_fraction", "rollout/response_length", "rollout/kept_groups"),
        title=f"{algo.adv_estimator}")


def build_scorer(cfg: DictConfig, caller: bool):
    """reward.functions (Python) and/or reward.remote_rm (serve_reward_model.py), weighted."""
    reward = cfg.reward
    parts = []
    if reward.functions:
        from aligner.rollout.reward_functions import RewardFunctions

        functions = RewardFunctions.from_config(to_plain(reward), "reward", base_dir=os.getcwd()) if caller else None
        parts.append((FunctionScorer(functions, [s.name for s in functions.specs] if functions else
                                     _function_names(reward)), 1.0))
    if reward.remote_rm.enable:
        remote = reward.remote_rm
        token = remote.auth_token or os.environ.get("ALIGNER_RM_TOKEN")
        client = CriticClient(str(remote.ip), int(remote.port), token=token,
                              request_timeout_s=float(remote.request_timeout_s),
                              total_timeout_s=float(remote.total_timeout_s)) if caller else None
        parts.append((RemoteRewardScorer(client), float(remote.weight)))
    if not parts:
        raise ConfigError("no reward: set reward.functions (Python reward functions) and/or reward.remote_rm.enable=true "
                          "(a reward-model server, serve_reward_model.py)")
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedScorer(parts)


def _function_names(reward) -> list[str]:
    from aligner.rollout.reward_functions import parse_reward_functions

    return [s.name for s in parse_reward_functions(to_plain(reward.functions), "reward.functions", os.getcwd())]


class CriticFree:
    """One of the critic-free estimators (``algorithm.adv_estimator``) on the engine."""

    def __init__(self, engine: RolloutEngine):
        cfg = engine.cfg
        self.cfg, self.algo = cfg, cfg.algorithm
        self.n = engine.settings.samples_per_prompt
        self.estimator = str(self.algo.adv_estimator)
        self.scorer = build_scorer(cfg, engine.is_caller)
        self.kl_in_reward = kl_estimator(self.algo.kl_penalty, "algorithm.kl_penalty")
        self.overlong = self.algo.overlong_buffer
        if self.overlong.enable:  # checked at start-up, not at the first step
            overlong_reward_penalty(torch.zeros(1), int(cfg.model.grpo.length_params.max_length),
                                    int(self.overlong.len), float(self.overlong.penalty_factor))

    # -- the batch: dynamic sampling and ReMax's greedy baseline
    def rollout(self, engine: RolloutEngine) -> Rollouts:
        filter_groups = self.algo.filter_groups
        if not filter_groups.enable:
            batch = engine.sample_step_batch()
            self.rounds, self.kept = 1, engine.settings.prompts_per_step // engine.run.layout.data_parallel
        else:
            batch = self._dynamic_batch(engine, int(filter_groups.max_num_gen_batches))
        if self.estimator == "remax":
            engine.collect_scores(batch)
            prompts = batch.prompt_index[::self.n].tolist()
            greedy = engine.generate(prompts, engine.prompts, engine.greedy_sampling, 1, fixed_seed=True)
            engine.collect_scores(greedy)
            batch.baseline_rewards = torch.where(greedy.valid, greedy.rewards, torch.nan)
        return batch

    def _dynamic_batch(self, engine: RolloutEngine, max_rounds: int) -> Rollouts:
        """DAPO's dynamic sampling: keep only groups whose rewards differ; sample more prompts
        (up to max_rounds generation rounds) until this rank has its share of groups."""
        target = engine.settings.prompts_per_step // engine.run.layout.data_parallel
        kept, have, last = [], 0, None
        counts: dict[str, float] = {}  # the scorer's counts over every round
        for round_ in range(max(max_rounds, 1)):
            batch = engine.sample_step_batch(round_)
            engine.collect_scores(batch)
            last = batch
            for name, value in batch.score_metrics.items():
                counts[name] = counts.get(name, 0.0) + value
            informative = groups_with_distinct_rewards(batch.rewards, self.n, batch.valid)  # [G]
            rows = torch.nonzero(informative.repeat_interleave(self.n)).flatten()
            if len(rows):
                kept.append(batch.select(rows))
                have += int(informative.sum())
            self.rounds = round_ + 1
            if have >= target:
                break
        if not kept:  # nothing informative in any round: train on the last batch (its advantages are all 0)
            self.kept = 0
            last.score_metrics = counts
            return last
        self.kept = min(have, target)
        merged = engine.concat(kept).select(torch.arange(self.kept * self.n))
        merged.score_metrics = counts
        return merged

    def before_scores(self, engine: RolloutEngine) -> dict[str, float]:
        return {}

    # -- advantages
    def advantages(self, engine: RolloutEngine, rollouts: Rollouts) -> PolicySignal:
        algo, n, mask = self.algo, self.n, rollouts.mask
        rewards, valid = rollouts.rewards.clone(), rollouts.valid
        if self.overlong.enable:
            rewards = rewards + overlong_reward_penalty(rollouts.response_lengths,
                                                        int(self.cfg.model.grpo.length_params.max_length),
                                                        int(self.overlong.len), float(self.overlong.penalty_factor))
        kl_coef = float(algo.kl_ctrl.kl_coef) if algo.use_kl_in_reward else 0.0
        kl = token_kl(rollouts.logprobs, rollouts.ref_logprobs, self.kl_in_reward) * mask
        token_rewards = kl_shaped_token_rewards(rewards, kl, mask, kl_coef)
        sequence_rewards = token_rewards.sum(dim=-1)  # the outcome reward minus the summed KL penalty
        estimator = self.estimator
        if estimator == "grpo":
            adv = broadcast_to_tokens(grpo_advantages(sequence_rewards, n, bool(algo.norm_adv_by_std_in_grpo),
                                                      valid), mask)
        elif estimator == "rloo":
            adv = broadcast_to_tokens(rloo_advantages(sequence_rewards, n, valid), mask)
        elif estimator == "remax":
            baseline = rollouts.baseline_rewards
            baseline_valid = (~baseline.isnan()).repeat_interleave(n)
            adv = broadcast_to_tokens(remax_advantages(sequence_rewards, torch.nan_to_num(baseline), n,
                                                       valid & baseline_valid), mask)
        elif estimator == "reinforce_plus_plus":
            adv = reinforce_plus_plus_advantages(token_rewards * valid.unsqueeze(1), mask, float(algo.gamma),
                                                 all_reduce_sum=all_reduce_sum_dp)
        else:  # reinforce_plus_plus_baseline
            adv = reinforce_plus_plus_baseline_advantages(sequence_rewards, mask, n, valid,
                                                          all_reduce_sum=all_reduce_sum_dp)
        policy_mask = mask * valid.float().unsqueeze(1)
        if algo.mask_truncated_completions:
            policy_mask = policy_mask * rollouts.is_end.float().unsqueeze(1)
        rows, tokens = float(len(rollouts)), float(mask.sum())
        metrics = {
            "kl": mean_over_dp(float(kl.sum() / max(rows, 1)), rows),  # per sequence, estimator kl_penalty
            "score_mean": mean_over_dp(float(sequence_rewards.mean()), rows),
            "valid_fraction": mean_over_dp(float(valid.float().mean()), rows),
            "kept_groups": float(all_reduce_sum_dp(torch.tensor([float(self.kept)]))),
            "generation_rounds": mean_over_dp(float(self.rounds), 1.0),
            "zero_advantage_fraction": mean_over_dp(float(masked_mean((adv == 0).float(), mask)), tokens),
        }
        return PolicySignal(adv, policy_mask, metrics)

    def after_advantages(self, engine: RolloutEngine, rollouts: Rollouts, signal: PolicySignal) -> None:
        pass

    def trains_policy(self, step: int) -> bool:
        return True

    def after_update(self, engine: RolloutEngine) -> dict[str, float]:
        return {}

    def checkpoint_state(self, engine: RolloutEngine) -> dict:
        return {}

    def resumed(self, engine: RolloutEngine) -> None:
        pass

    def close(self) -> None:
        for scorer, _ in getattr(self.scorer, "parts", [(self.scorer, 1.0)]):
            closer = getattr(scorer, "close", None)
            if closer:
                closer()


def build_engine(cfg: DictConfig, schema) -> RolloutEngine:
    return RolloutEngine(cfg, schema, engine_settings(cfg), CriticFree)


def train(cfg: DictConfig, schema) -> dict:
    return build_engine(cfg, schema).train()
