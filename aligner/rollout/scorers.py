"""Scorers: where the rewards (and, for PPO, the critic's values) of a batch of rollouts come from.

The engine hands every generated micro-batch to ``submit`` as soon as it exists (remote scorers
fire their HTTP request then, so the server works while the actor computes log-probs), and
calls ``collect`` once for the whole batch. The engine never knows whether HTTP is involved.

* ``RemoteCriticScorer``: the PPO critic + reward-model server (values and rewards);
* ``RemoteRewardScorer``: a reward-model-only server (serve_reward_model.py): rewards;
* ``FunctionScorer``: Python reward functions (aligner/rollout/reward_functions.py);
* ``WeightedScorer``: a weighted sum of the rewards of several scorers.

Scorers run on the tensor-parallel source rank only; the engine broadcasts their result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from aligner.rollout.batch import Rollouts, pad_columns
from aligner.serving.client import CriticClient


@dataclass
class Chunk:
    """One generated micro-batch, as scorers see it."""

    tokens: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B]
    prompts: list[str]
    responses: list[str]
    fields: list[dict]


@dataclass
class Scores:
    rewards: torch.Tensor  # [N] float32
    valid: torch.Tensor  # [N] bool
    values: torch.Tensor | None = None  # [N, S] float32
    metrics: dict[str, float] = field(default_factory=dict)  # counts over this batch (summed over DP)


class Scorer(Protocol):
    provides_values: bool
    metric_names: Sequence[str]  # the keys of Scores.metrics, fixed (every rank logs the same set)

    def submit(self, chunk: Chunk) -> Any: ...

    def collect(self, handles: list, rollouts: Rollouts) -> Scores: ...


class RemoteCriticScorer:
    """The combined critic + reward-model server; with ``reward_model`` set, rewards come from
    that separate reward-model server instead (NeMo's combine_rm_and_critic_server=false)."""

    provides_values = True
    metric_names = ()

    def __init__(self, critic: CriticClient, reward_model: CriticClient | None = None):
        self.critic, self.reward_model = critic, reward_model

    def submit(self, chunk: Chunk) -> Any:
        values = self.critic.infer_async(chunk.tokens, chunk.lengths)
        rewards = self.reward_model.infer_async(chunk.tokens, chunk.lengths) if self.reward_model else None
        return values, rewards

    def collect(self, handles: list, rollouts: Rollouts) -> Scores:
        width = rollouts.tokens.shape[1]
        results = [v.result() for v, _ in handles]
        source = [r.result() for _, r in handles] if self.reward_model is not None else results
        if any("rewards" not in r for r in source):
            raise RuntimeError("the critic server returned no rewards: start it with "
                               "trainer.ppo.combine_rm_and_critic_server=True, or set "
                               "remote_critic_rm.combine_rm_and_critic_server=False and run serve_reward_model.py")
        values = torch.cat([pad_columns(r["values"].float(), width) for r in results])
        rewards = torch.cat([r["rewards"].float() for r in source])
        return Scores(rewards, torch.ones_like(rewards, dtype=torch.bool), values)


class RemoteRewardScorer:
    """A reward-model server (serve_reward_model.py): its ``rewards``, standardised as it serves them."""

    provides_values = False
    metric_names = ()

    def __init__(self, client: CriticClient):
        self.client = client

    def submit(self, chunk: Chunk) -> Any:
        return self.client.infer_async(chunk.tokens, chunk.lengths)

    def collect(self, handles: list, rollouts: Rollouts) -> Scores:
        rewards = torch.cat([h.result()["rewards"].float() for h in handles])
        return Scores(rewards, torch.ones_like(rewards, dtype=torch.bool))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


class FunctionScorer:
    """Python reward functions, called once per batch (reward.functions); see reward_functions.py."""

    provides_values = False

    def __init__(self, functions, names: Sequence[str]):
        from aligner.rollout.reward_functions import COUNT_KINDS

        self.functions = functions  # None on ranks that do not score
        self.metric_names = tuple(f"reward_fn/{name}/{kind}" for name in names for kind in COUNT_KINDS) + (
            "reward_fn/invalid",)

    def submit(self, chunk: Chunk) -> Any:
        return chunk

    def collect(self, handles: list, rollouts: Rollouts) -> Scores:
        prompts = [p for c in handles for p in c.prompts]
        responses = [r for c in handles for r in c.responses]
        rows = [f for c in handles for f in c.fields]
        columns = sorted({k for row in rows for k in row})
        result = self.functions(prompts, responses, **{k: [row.get(k) for row in rows] for k in columns})
        return Scores(result.rewards.float(), result.valid.bool(),
                      metrics={f"reward_fn/{k}": float(v) for k, v in result.counts.items()})

    def close(self) -> None:
        if self.functions is not None:
            self.functions.close()


class WeightedScorer:
    """sum_i w_i * rewards_i; a sample is valid where every part could score it. Values come from
    the one part that provides them (at most one may)."""

    def __init__(self, parts: list[tuple[Any, float]]):
        if not parts:
            raise ValueError("a weighted scorer needs at least one part")
        with_values = [s for s, _ in parts if s.provides_values]
        if len(with_values) > 1:
            raise ValueError("at most one scorer may provide critic values")
        self.parts = parts
        self.provides_values = bool(with_values)
        self.metric_names = tuple(name for s, _ in parts for name in s.metric_names)

    def submit(self, chunk: Chunk) -> Any:
        return [scorer.submit(chunk) for scorer, _ in self.parts]

    def collect(self, handles: list, rollouts: Rollouts) -> Scores:
        total = valid = values = None
        metrics: dict[str, float] = {}
        for i, (scorer, weight) in enumerate(self.parts):
            scores = scorer.collect([h[i] for h in handles], rollouts)
            part = weight * scores.rewards
            total = part if total is None else total + part
            valid = scores.valid if valid is None else valid & scores.valid
            values = scores.values if scores.values is not None else values
            metrics.update(scores.metrics)
        return Scores(total, valid, values, metrics)
