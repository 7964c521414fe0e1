"""PPO critic (+ reward model) server, model side: what every rank computes for infer/train/save.

The critic is initialised from the reward model (RM) and keeps its scalar head. Three modes:

* ``critic+rm`` (``trainer.ppo.combine_rm_and_critic_server=true``): the RM weights are parked
  in host memory at start-up, *before* any resume, so they stay the RM's whatever the critic
  has learned since; infer swaps them in for the rewards (one network, two weight sets);
* ``critic``: values only (the actor asks a separate RM server for rewards);
* ``rm`` (``serve_reward_model.py``): rewards only. ``/v1/infer`` must carry ``values`` by
  protocol, so this mode answers ``values`` = zeros ``[B, S]``; train is refused.

Shapes: ``tokens`` int64 ``[B, S]`` right-padded, ``lengths`` int64 ``[B]`` (1..S);
``values[b, t]`` is the value head's output at position t (having read tokens 0..t), 0 for
``t >= lengths[b]``; ``rewards[b]`` is the RM head at the last real token ``lengths[b] - 1``,
standardised ``(r - mean) / std`` when reward standardisation is on. Any B works: every rank
takes its data-parallel share (``split_for_rank``), cuts it into micro-batches and pads the last
one by repeating a row, so no batch size can crash a fixed-shape schedule.

Train runs ``trainer.ppo.critic_epochs`` passes over ``trainer.ppo.critic_mini_batches``
contiguous mini-batches of the request, one optimizer step each, minimising the clipped value
loss ``0.5 * max((v - R)^2, (clip(v, v_old +- loss_clip_val) - R)^2)`` averaged over every
masked token of the mini-batch on all data-parallel ranks (sum / global count, so DP=1 and DP=N
make the same update). Positions at or beyond ``lengths`` never count, whatever ``mask`` says.

Exactly-once training, and why it is enough across a process restart
--------------------------------------------------------------------
Within one server process the HTTP layer replays a retried ``Idempotency-Key`` from memory
(aligner.serving.idempotency), and this module also remembers the keys it applied. A save
records those keys and the count of applied train requests in the checkpoint. After a crash
and restart with ``exp_manager.resume_if_exists`` the critic *is* the last checkpoint, so:

* a retried key applied *before* that checkpoint is in the restored key list: it is answered
  with its recorded metrics and not trained again (its effect is in the restored weights);
* a retried key applied *after* that checkpoint is trained again, legitimately: its earlier
  application died with the process, so the restored state has never seen it.

Either way every train request is reflected exactly once in the state the server holds. The
actor ties its own checkpoint to the critic's (``save(step)`` with the PPO step id), so a
restarted actor replays exactly the requests after that step.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig

from aligner.models.gpt import position_ids_for
from aligner.models.weight_swap import ParkedWeights
from aligner.objectives.ppo import clipped_value_loss
from aligner.objectives.rewards import standardize_rewards
from aligner.faults import fault_point
from aligner.serving.followers import gather_from_ranks, split_for_rank
from aligner.serving.protocol import ProtocolError
from aligner.trainers.reward_model import last_token_values
from aligner.training import checkpoint
from aligner.training.config_check import ConfigError
from aligner.training.offload import OptimizerStateOffloader
from aligner.training.optim import load_scheduler_state
from aligner.training.run import Run
from aligner.training.step import ForwardOnly, collect_forward, split_micro_batches, train_step

log = logging.getLogger("aligner.critic")

MODES = ("critic+rm", "critic", "rm")
TOKEN_ENV = {"ppo": "ALIGNER_CRITIC_TOKEN", "rm_server": "ALIGNER_RM_TOKEN"}


# --------------------------------------------------------------------------------------------
# Micro-batch "losses" for megatron's schedule
# --------------------------------------------------------------------------------------------


def length_mask(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    """lengths [B] -> bool [B, S], True at positions t < lengths[b]."""
    return torch.arange(seq, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class TokenValues(ForwardOnly):
    """The head's output per position, ``values`` [mb, S] float32, zero beyond each row's length
    (critic values and, with RM weights, rewards)."""

    def run(self, model, batch):
        tokens = batch["tokens"]
        return model(tokens, position_ids_for(tokens), None)

    def outputs(self, output, batch):
        tokens = batch["tokens"]
        values = output.reshape(tokens.shape).float()
        zero = torch.zeros((), device=values.device)
        return {"values": torch.where(length_mask(batch["lengths"], tokens.shape[1]), values, zero)}


class ClippedValueLoss:
    """The critic's training loss on one micro-batch of {tokens, lengths, returns, prev_values,
    mask}; ``mask`` [mb, S] is already 0/1 and 0 on padding rows and beyond lengths.

    Returns (loss sum, masked-token count): megatron divides the gradient by the count summed
    over micro-batches and data-parallel ranks, which makes the loss a global masked mean.
    """

    metric_names = ("value_loss", "value_clip_fraction")

    def __init__(self, clip_val: float | None):
        self.clip_val = clip_val

    def forward(self, model, batch):
        tokens = batch["tokens"]
        output = model(tokens, position_ids_for(tokens), None)

        def loss_fn(output):
            values = output.reshape(tokens.shape).float()
            mask = batch["mask"]
            count = mask.sum()
            mean, metrics = clipped_value_loss(values, batch["prev_values"], batch["returns"], mask, self.clip_val)
            loss_sum = mean * count
            sums = {
                "value_loss": torch.stack([loss_sum.detach(), count]),
                "value_clip_fraction": torch.stack([metrics["value_clip_fraction"] * count, count]),
            }
            return loss_sum, count.round().to(torch.int), sums

        return output, loss_fn


# --------------------------------------------------------------------------------------------
# Batching (pure)
# --------------------------------------------------------------------------------------------


def mini_batch_slices(batch_size: int, mini_batches: int) -> list[slice]:
    """Contiguous row ranges of near-equal size (differing by at most one row).

    Never more mini-batches than rows: a request smaller than trainer.ppo.critic_mini_batches
    is trained in one-row mini-batches rather than rejected.
    """
    if batch_size < 1 or mini_batches < 1:
        raise ValueError(f"need batch_size >= 1 and mini_batches >= 1, got {batch_size}, {mini_batches}")
    count = min(mini_batches, batch_size)
    base, extra = divmod(batch_size, count)
    slices, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        slices.append(slice(start, start + size))
        start += size
    return slices


def pad_rows(tensors: dict[str, torch.Tensor], multiple: int,
             zero_fields: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Pad dim 0 up to a multiple of ``multiple`` by repeating the last row (valid inputs,
    lengths >= 1); ``zero_fields`` get zero rows instead (e.g. the loss mask)."""
    rows = next(iter(tensors.values())).shape[0]
    missing = -rows % multiple
    if missing == 0:
        return dict(tensors)
    out = {}
    for name, tensor in tensors.items():
        if name in zero_fields:
            filler = torch.zeros((missing, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        else:
            filler = tensor[-1:].expand(missing, *tensor.shape[1:])
        out[name] = torch.cat([tensor, filler], dim=0)
    return out


def resolve_reward_standardization(enable: bool, mean: float | None, std: float | None,
                                   from_checkpoint: dict | None) -> tuple[float, float] | None:
    """(mean, std) to standardise rewards with, or None.

    Off unless ``model.reward_standardization.enable``; then the configured mean/std when both
    are set, else the ones the reward-model trainer stored in its checkpoint.
    """
    if not enable:
        return None
    if mean is not None and std is not None:
        chosen, source = (float(mean), float(std)), "model.reward_standardization.{mean,std}"
    elif from_checkpoint and from_checkpoint.get("mean") is not None and from_checkpoint.get("std") is not None:
        chosen, source = (float(from_checkpoint["mean"]), float(from_checkpoint["std"])), "the RM checkpoint"
    else:
        raise ConfigError(
            "model.reward_standardization.enable=true but neither model.reward_standardization.{mean,std} are "
            "set nor does the reward-model checkpoint (pretrained_checkpoint.restore_from_path) store them: set "
            "both, or enable=false"
        )
    if not chosen[1] > 0 or not all(math.isfinite(v) for v in chosen):
        raise ConfigError(f"reward standardisation from {source}: need finite mean and std > 0, got {chosen}")
    return chosen


def combine_step_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """One request's metrics from its optimizer steps: means of the per-step losses (each taken
    before that step's update), mean grad norm, the last learning rate."""
    if not steps:
        nan = float("nan")
        return {"value_loss": nan, "value_clip_fraction": nan, "grad_norm": nan, "lr": nan,
                "optimizer_steps": 0.0, "updates_skipped": 0.0}
    mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
    return {
        "value_loss": mean("value_loss"),
        "value_clip_fraction": mean("value_clip_fraction"),
        "grad_norm": mean("grad_norm"),
        "lr": steps[-1]["lr"],
        "optimizer_steps": float(len(steps)),
        "updates_skipped": float(sum(s.get("update_skipped", 0.0) for s in steps)),
    }


# --------------------------------------------------------------------------------------------
# The per-rank worker
# --------------------------------------------------------------------------------------------


class CriticWorker:
    """Executes one command on this rank; every rank of the job makes the same call in the same
    order (rank 0 from the HTTP front, the others from the follower loop).

    reward_weights: the RM's weights parked in host memory (``critic+rm``), or None (in ``rm``
    mode the live weights are the RM's; in ``critic`` mode there are no rewards).
    restored: trainer state of the checkpoint resumed from ({} on a fresh start).
    """

    def __init__(self, run: Run, mode: str, *, inference_micro_batch_size: int, loss_clip_val: float | None,
                 critic_epochs: int = 1, critic_mini_batches: int = 1, reward_weights: ParkedWeights | None = None,
                 reward_stats: tuple[float, float] | None = None, restored: dict | None = None,
                 remembered_keys: int = 1024, offload_adam_states: bool = False, offload_device: str = "cpu"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "critic+rm" and reward_weights is None:
            raise ValueError("critic+rm mode needs the parked reward-model weights")
        self.run = run
        self.mode = mode
        self.infer_mbs = int(inference_micro_batch_size)
        self.loss = ClippedValueLoss(loss_clip_val)
        self.epochs = int(critic_epochs)
        self.mini_batches = int(critic_mini_batches)
        self.reward_weights = reward_weights
        self.reward_stats = reward_stats
        self.device = run.layout.device
        self.remembered_keys = max(1, int(remembered_keys))
        self._adopt(restored or {})
        # model.offload_adam_states: Adam's moments live in host memory between train requests
        # (the accelerator holds them only inside train, save and restore), bitwise unchanged.
        self.offloader = OptimizerStateOffloader(run.optimizer, offload_device) if offload_adam_states else None
        if self.offloader is not None:
            self.offloader.offload()

    def _adopt(self, state: dict) -> None:
        """The record of applied updates held by a checkpoint's trainer state ({}: a fresh start)."""
        self.applied_train_requests = int(state.get("applied_train_requests", 0))
        # The PPO step the state has reached: that of the last applied train request. A
        # checkpoint is labelled with it and nothing else (check_save).
        self.trained_step = int(state.get("trained_step", state.get("ppo_step", 0)))
        self.checkpoint_step = int(state["ppo_step"]) if "ppo_step" in state else None
        results = state.get("idempotency_results") or {}
        self.applied_keys: OrderedDict[str, dict[str, float]] = OrderedDict(
            (key, results.get(key, {})) for key in state.get("idempotency_keys", []))
        self.last_train: dict[str, float] = {}

    @contextlib.contextmanager
    def adam_states_on_device(self) -> Iterator[None]:
        """Adam states where the optimizer needs them for the duration; back to host afterwards."""
        if self.offloader is None:
            yield
            return
        self.offloader.restore()
        try:
            yield
        finally:
            self.offloader.offload()

    # -- checks rank 0 makes before broadcasting (a bad request must not reach the followers) --

    def check_request(self, route: str, tensors: dict[str, torch.Tensor]) -> None:
        """What this model cannot take whatever its state (mode, vocabulary, context): 4xx naming
        the field. Reads nothing a call changes, so the HTTP front runs it before the request
        waits for the model (the schema and the size limits were checked before it)."""
        if route == "train" and self.mode == "rm":
            raise ProtocolError(409, "this is a reward-model-only server (serve_reward_model.py): it has no critic "
                                     "to train; send /v1/train to the critic server (serve_ppo_critic.py)")
        self._check_tokens(tensors["tokens"])

    def check_infer(self, tensors: dict[str, torch.Tensor]) -> None:
        self.check_request("infer", tensors)

    def check_train(self, tensors: dict[str, torch.Tensor], step: int | None = None) -> None:
        self.check_request("train", tensors)
        if step is not None and step != self.trained_step + 1:
            raise ProtocolError(409, f"metadata 'step': this train request completes PPO step {step}, but the "
                                     f"critic's state is at step {self.trained_step}; send the train requests of "
                                     f"steps {self.trained_step + 1}..{step - 1} first (critic_step="
                                     f"{self.trained_step})")

    def check_save(self, step: int) -> None:
        """A checkpoint's label must be the step its state has reached, never another."""
        if self.mode == "rm":
            raise ProtocolError(409, "this is a reward-model-only server: there is no critic state to save")
        if step != self.trained_step:
            raise ProtocolError(409, f"metadata 'step': refusing to label a checkpoint PPO step {step}: the "
                                     f"critic's state is at step {self.trained_step} (its last applied train "
                                     f"request); send the missing train requests first (critic_step="
                                     f"{self.trained_step})")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        config = self.run.model_config
        top = int(tokens.max())
        if top >= config.vocab_size:
            raise ProtocolError(422, f"field 'tokens': id {top} is outside the model's vocabulary of "
                                     f"{config.vocab_size}; do the actor and the critic use the same tokenizer "
                                     "(model.tokenizer.model)?")
        if not config.is_llama and tokens.shape[1] > config.max_position_embeddings:
            raise ProtocolError(422, f"field 'tokens': sequence length {tokens.shape[1]} exceeds the model's "
                                     f"max_position_embeddings={config.max_position_embeddings}")

    def recorded_result(self, key: str | None) -> dict[str, float] | None:
        """Metrics of a train request already applied to the current state, else None."""
        if key is None or key not in self.applied_keys:
            return None
        return {**self.applied_keys[key], "replayed": 1.0}

    # -- commands ------------------------------------------------------------------------------

    def infer(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{tokens [B,S], lengths [B]} -> {values [B,S]} (+ rewards [B]); full batch on every rank."""
        from megatron.core import parallel_state

        fault_point("critic.infer")
        tokens = tensors["tokens"].to(self.device)
        lengths = tensors["lengths"].to(self.device)
        batch, seq = tokens.shape
        layout = self.run.layout
        share, _ = split_for_rank({"tokens": tokens, "lengths": lengths}, layout.dp_rank, layout.data_parallel)
        rows = share["tokens"].shape[0]
        micro = split_micro_batches(pad_rows(share, self.infer_mbs), self.infer_mbs)

        out: dict[str, torch.Tensor] = {}
        if self.mode != "rm":
            out["values"] = self._head_outputs(micro)[:rows]
        if self.mode == "critic+rm":
            with self.reward_weights.swapped_in(self.run.model):
                rm_values = self._head_outputs(micro)[:rows]
        elif self.mode == "rm":
            rm_values = self._head_outputs(micro)[:rows]
        if self.mode in ("critic+rm", "rm"):
            out["rewards"] = standardize_rewards(last_token_values(rm_values, share["lengths"]), self.reward_stats)

        full = gather_from_ranks(out, batch, parallel_state.get_data_parallel_group())
        if self.mode == "rm":
            full["values"] = torch.zeros(batch, seq, dtype=torch.float32, device=self.device)
        return full

    def _head_outputs(self, micro_batches: list[dict]) -> torch.Tensor:
        records = collect_forward(self.run.model, TokenValues(), micro_batches)
        return torch.cat([record["values"] for record in records], dim=0)

    def train(self, tensors: dict[str, torch.Tensor], key: str | None = None,
              step: int | None = None) -> dict[str, float]:
        """Optimizer steps on {tokens, lengths, returns, prev_values, mask}; returns metrics.
        ``step``: the PPO step this request completes (check_train has checked the order)."""
        layout = self.run.layout
        data = {name: tensors[name].to(self.device) for name in ("tokens", "lengths", "returns", "prev_values")}
        seq = data["tokens"].shape[1]
        data["mask"] = ((tensors["mask"].to(self.device) != 0) & length_mask(data["lengths"], seq)).float()
        micro_size = self.run.micro_batch_size

        with self.adam_states_on_device():
            steps = self._optimizer_steps(data, micro_size, layout)
        fault_point("critic.train")
        self.applied_train_requests += 1
        self.trained_step = step if step is not None else self.trained_step + 1
        metrics = combine_step_metrics(steps)
        self.last_train = dict(metrics)
        self.run.metrics.log(self.applied_train_requests, {f"train/{k}": v for k, v in metrics.items()})
        result = {**metrics, "critic_step": float(self.trained_step),
                  "applied_train_requests": float(self.applied_train_requests)}
        if key is not None:
            self.applied_keys[key] = dict(result)
            self.applied_keys.move_to_end(key)
            while len(self.applied_keys) > self.remembered_keys:
                self.applied_keys.popitem(last=False)
        return result

    def _optimizer_steps(self, data: dict[str, torch.Tensor], micro_size: int, layout) -> list[dict[str, float]]:
        steps = []
        for _ in range(self.epochs):
            for rows in mini_batch_slices(data["tokens"].shape[0], self.mini_batches):
                mini = {name: tensor[rows] for name, tensor in data.items()}
                # Every rank holds the whole request, so all of them skip the same steps.
                if not bool(mini["mask"].any()):
                    continue
                share, real = split_for_rank(mini, layout.dp_rank, layout.data_parallel)
                share["mask"][real:] = 0  # rows repeated to even out the DP shares do not count
                micro = split_micro_batches(pad_rows(share, micro_size, zero_fields=("mask",)), micro_size)
                steps.append(train_step(self.run.model, self.run.optimizer, self.run.scheduler, self.loss, micro))

        return steps

    def save(self, step: int) -> dict[str, Any]:
        """Native checkpoint ``step_<step>`` under exp_manager.explicit_log_dir/checkpoints (where
        a restarted server resumes from, and the only place a critic ever writes). Keeps the last
        ``exp_manager.checkpoint_callback_params.save_top_k`` critic checkpoints there. Collective."""
        self.check_save(step)  # rank 0 checked before broadcasting; the others agree
        self.run.step = int(step)
        extra = {
            "ppo_step": int(step),
            "trained_step": self.trained_step,
            "applied_train_requests": self.applied_train_requests,
            "idempotency_keys": list(self.applied_keys),
            "idempotency_results": dict(self.applied_keys),
            "critic_mode": self.mode,
        }
        directory = self.run.checkpoint_dir
        with self.adam_states_on_device():
            final = checkpoint.save(directory, self.run.step, self.run.model, self.run.optimizer,
                                    self.run.trainer_state(extra), keep_last=None)
        keep = self.run.cfg.exp_manager.checkpoint_callback_params.save_top_k
        if keep and self.run.is_rank_zero:
            for old in prune_critic_checkpoints(directory, int(keep)):
                log.info("pruned critic checkpoint %s (save_top_k=%d)", old, int(keep))
        self.checkpoint_step = int(step)
        return {"path": str(final), "step": int(step)}

    def check_restore(self, step: int) -> Path:
        """The server's own complete checkpoint of ``step``; 404/409 naming what exists otherwise."""
        if self.mode == "rm":
            raise ProtocolError(409, "this is a reward-model-only server: there is no critic state to restore")
        path = self.run.checkpoint_dir / checkpoint.step_dir_name(step)
        if not (path / checkpoint.MARKER).is_file():
            have = [s for s, _ in checkpoint.list_complete(self.run.checkpoint_dir)]
            raise ProtocolError(404, f"metadata 'step': the critic has no complete checkpoint of PPO step {step} "
                                     f"in {self.run.checkpoint_dir} (complete: {have or 'none'}); restart both "
                                     f"sides from a tied checkpoint pair")
        return path

    def restore(self, step: int) -> dict[str, Any]:
        """Rewind to this server's checkpoint of ``step``: weights, Adam state, scheduler, RNG and
        the record of applied updates, as a restarted server resuming from it would hold. Newer
        critic checkpoints belong to the abandoned timeline: they are renamed ``*.rewound`` (kept
        for inspection, never resumed from). Collective."""
        path = self.check_restore(step)
        rewound_from = self.trained_step
        with self.adam_states_on_device():
            state = checkpoint.load(path, self.run.model, self.run.optimizer)
        load_scheduler_state(self.run.scheduler, state["scheduler"])
        self.run.step = int(state["step"])
        self._adopt(state)
        if self.run.is_rank_zero:
            for newer_step, newer in checkpoint.list_complete(self.run.checkpoint_dir):
                if newer_step > step and "critic_mode" in checkpoint.read_trainer_state(newer):
                    aside = newer.with_name(newer.name + ".rewound")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(newer, aside)
                    log.warning("critic checkpoint %s is newer than the restored step %d: moved to %s", newer,
                                step, aside)
        log.warning("critic rewound from PPO step %d to its checkpoint of step %d (%s)", rewound_from, step, path)
        return {"path": str(path), "step": int(step), "rewound_from": int(rewound_from)}

    def metrics(self) -> dict[str, Any]:
        layout = self.run.layout
        return {
            "mode": self.mode,
            "applied_train_requests": self.applied_train_requests,
            "critic_step": self.trained_step,
            "trained_step": self.trained_step,
            "checkpoint_step": self.checkpoint_step,
            "remembered_keys": len(self.applied_keys),
            "adam_states_offloaded": bool(self.offloader is not None and self.offloader.offloaded),
            "reward_standardization": (None if self.reward_stats is None
                                       else {"mean": self.reward_stats[0], "std": self.reward_stats[1]}),
            "last_train": dict(self.last_train),
            "world_size": layout.world_size,
            "tensor_parallel": layout.tensor_parallel,
            "data_parallel": layout.data_parallel,
        }


def prune_critic_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` critic checkpoints in ``directory``; returns the deleted.

    Only what a critic server wrote there counts: complete ``step_N`` directories (not symlinks)
    whose trainer_state.json has ``critic_mode``. Anything else in the directory (another
    trainer's checkpoint, a link, a stray name) is never touched.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(directory).resolve()
    ours = []
    for step, path in checkpoint.list_complete(root):
        if path.is_symlink() or path.resolve().parent != root:
            continue
        try:
            state = checkpoint.read_trainer_state(path)
        except (checkpoint.CheckpointError, OSError):
            continue
        if "critic_mode" in state:
            ours.append((step, path))
    pruned = [path for _, path in ours[:-keep]]
    for path in pruned:
        shutil.rmtree(path, ignore_errors=True)
    return pruned


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def _world_size() -> int:
    from aligner.distributed.launch_env import detect_launch_env

    return detect_launch_env(os.environ).world_size


def _prepare_config(cfg: DictConfig, schedule_steps: int, mode_is_rm_only: bool) -> DictConfig:
    """The config Run is built from: fills what a server derives rather than asks for."""
    if not cfg.pretrained_checkpoint.restore_from_path:
        raise ConfigError("pretrained_checkpoint.restore_from_path is null: the critic and reward model are "
                          "initialised from a reward-model run (train_reward_model.py's exp_manager.explicit_log_dir)")
    if int(cfg.model.pipeline_model_parallel_size) != 1:
        raise ConfigError("model.pipeline_model_parallel_size must be 1 for the critic/RM server "
                          "(use tensor or data parallelism)")
    run_cfg = copy.deepcopy(cfg)
    if mode_is_rm_only:
        run_cfg.exp_manager.resume_if_exists = False  # an RM server has no state of its own to resume
    if run_cfg.model.global_batch_size is None:  # the batch is whatever the actor sends
        run_cfg.model.global_batch_size = int(run_cfg.model.micro_batch_size) * _world_size()
    sched = run_cfg.model.optim.get("sched")
    if sched is not None and sched.get("max_steps") is None:
        sched.max_steps = max(1, schedule_steps)
    if run_cfg.model.tokenizer.model is None:
        run_cfg.model.tokenizer.model = _tokenizer_of(str(cfg.pretrained_checkpoint.restore_from_path))
    return run_cfg


def _tokenizer_of(restore_from_path: str) -> str:
    from aligner.models import pretrained

    fmt, src = pretrained.detect_format(restore_from_path)
    if fmt == "hf":
        return str(src)
    recorded = checkpoint.read_trainer_state(src).get("tokenizer")
    if not recorded:
        raise ConfigError(f"model.tokenizer.model is null and {src} records no tokenizer: set model.tokenizer.model")
    return str(recorded)


def _check_reward_model(run: Run, needs_rm: bool) -> dict:
    """The RM checkpoint's trainer state; insist that it really has a trained scalar head when
    rewards come from it."""
    if run.pretrained_format != "native":
        return {}
    state = checkpoint.read_trainer_state(run.pretrained_path)
    if not state.get("scalar_head"):
        message = (f"pretrained_checkpoint.restore_from_path resolves to {run.pretrained_path}, a "
                   f"{state.get('algorithm', 'non-RM')} checkpoint without a scalar head")
        if needs_rm:
            raise ConfigError(message + ": rewards need a reward-model checkpoint (train_reward_model.py)")
        log.warning("%s: the critic starts with a fresh value head", message)
    return state


def build_worker(cfg: DictConfig, schema, loop_key: str, mode: str) -> CriticWorker:
    """Everything before serving, on every rank: model from the RM, parked RM weights, resume."""
    loop_cfg = cfg.trainer[loop_key]
    epochs = int(loop_cfg.get("critic_epochs", 1))
    mini_batches = int(loop_cfg.get("critic_mini_batches", 1))
    for key, value in (("inference_micro_batch_size", loop_cfg.inference_micro_batch_size),
                       ("critic_epochs", epochs), ("critic_mini_batches", mini_batches)):
        if int(value) < 1:  # checked before the (slow) model set-up
            raise ConfigError(f"trainer.{loop_key}.{key} must be >= 1, got {value}")
    run_cfg = _prepare_config(cfg, int(loop_cfg.max_steps) * epochs * mini_batches, mode == "rm")
    run = Run(run_cfg, loop_key, schema, scalar_head=True, resume=False)
    rm_state = _check_reward_model(run, needs_rm=mode != "critic")
    stats = None
    if mode != "critic":
        standardization = cfg.model.reward_standardization
        stats = resolve_reward_standardization(bool(standardization.enable), standardization.mean,
                                               standardization.std, rm_state.get("reward_standardization"))
    # Parked before any resume: the live weights are still exactly the reward model's.
    reward_weights = ParkedWeights(run.model) if mode == "critic+rm" else None
    restored = run.resume_latest()
    if restored:
        log.info("critic resumed at PPO step %d (%d train requests applied)", run.step,
                 int(restored.get("applied_train_requests", 0)))
    if run.is_rank_zero:
        log.info("%s server ready to start: reward standardisation %s", mode,
                 "off" if stats is None else f"mean={stats[0]:.4f} std={stats[1]:.4f}")
    return CriticWorker(
        run, mode,
        inference_micro_batch_size=int(loop_cfg.inference_micro_batch_size),
        loss_clip_val=(None if cfg.model.get("loss_clip_val") is None else float(cfg.model.loss_clip_val)),
        critic_epochs=epochs, critic_mini_batches=mini_batches, reward_weights=reward_weights,
        reward_stats=stats, restored=restored,
        remembered_keys=int(loop_cfg.get("idempotency_cache_size", 1024) or 1024),
        offload_adam_states=bool(cfg.model.get("offload_adam_states", False)),
        offload_device=str(cfg.model.get("offload_device", "cpu")),
    )


def resolve_token(loop_cfg: DictConfig, loop_key: str, environ=os.environ) -> str | None:
    """The bearer token: trainer.<loop>.auth_token, else the environment variable, else None."""
    token = loop_cfg.get("auth_token") or environ.get(TOKEN_ENV[loop_key]) or None
    return None if token is None else str(token)


def check_auth_settings(loop_cfg: DictConfig, loop_key: str, token: str | None) -> None:
    """Refuse (before the slow model set-up) to serve beyond loopback without a token."""
    from aligner.serving.server import InsecureBindError, check_bind

    allow = bool(loop_cfg.get("allow_unauthenticated", False))
    try:
        check_bind(str(loop_cfg.host), token, allow)
    except InsecureBindError:
        prefix = f"trainer.{loop_key}"
        raise ConfigError(
            f"{prefix}.host={loop_cfg.host} accepts connections from other machines, but no token is set: "
            f"anyone who can reach it could train the critic and make it write checkpoints. Set "
            f"{prefix}.auth_token (or the environment variable {TOKEN_ENV[loop_key]}) and give the actor the "
            f"same token (remote_critic_rm.auth_token or ALIGNER_CRITIC_TOKEN), or bind {prefix}.host=127.0.0.1, "
            f"or accept the risk with {prefix}.allow_unauthenticated=true"
        ) from None


def resolve_size_limits(loop_cfg: DictConfig, loop_key: str, model_config) -> tuple[int, int | None]:
    """(max_sequence_length, max_tokens_per_request) from trainer.<loop>: the sequence limit
    defaults to the model's context (max_position_embeddings); null tokens means unbounded."""
    prefix = f"trainer.{loop_key}"
    context = int(model_config.max_position_embeddings)
    seq = loop_cfg.get("max_sequence_length")
    tokens = loop_cfg.get("max_tokens_per_request")
    for key, value in (("max_sequence_length", seq), ("max_tokens_per_request", tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{prefix}.{key} must be an integer >= 1 or null, got {value!r}")
    if seq is None:
        seq = context
    elif seq > context and not model_config.is_llama:
        raise ConfigError(f"{prefix}.max_sequence_length={seq} exceeds the model's learned positions "
                          f"(max_position_embeddings={context}); use at most {context} or null")
    return int(seq), (None if tokens is None else int(tokens))


def _serve(cfg: DictConfig, schema, loop_key: str, mode: str) -> None:
    from aligner.trainers import critic_server

    loop_cfg = cfg.trainer[loop_key]
    token = resolve_token(loop_cfg, loop_key)
    check_auth_settings(loop_cfg, loop_key, token)
    if int(os.environ.get("RANK", "0")) == 0 and loop_cfg.get("ready_file"):
        critic_server.remove_ready_file(str(loop_cfg.ready_file))  # never let a waiter read a stale one
    worker = build_worker(cfg, schema, loop_key, mode)
    try:
        max_sequence_length, max_tokens = resolve_size_limits(loop_cfg, loop_key, worker.run.model_config)
        if worker.run.is_rank_zero:
            critic_server.serve_rank0(
                worker, host=str(loop_cfg.host), port=int(loop_cfg.port), token=token,
                ready_file=loop_cfg.get("ready_file"), threads=int(loop_cfg.threads),
                queue_limit=int(loop_cfg.queue_limit), max_request_bytes=int(loop_cfg.max_request_bytes),
                idempotency_cache_size=int(loop_cfg.idempotency_cache_size),
                max_sequence_length=max_sequence_length, max_tokens_per_request=max_tokens,
                allow_unauthenticated=bool(loop_cfg.get("allow_unauthenticated", False)),
            )
        else:
            critic_server.follow(worker)
    finally:
        worker.run.finish()


def serve(cfg: DictConfig, schema) -> None:
    """Entry of serve_ppo_critic.py: the critic (and, combined, the RM) until SIGTERM/SIGINT."""
    mode = "critic+rm" if bool(cfg.trainer.ppo.combine_rm_and_critic_server) else "critic"
    _serve(cfg, schema, "ppo", mode)


def serve_reward_model(cfg: DictConfig, schema) -> None:
    """Entry of serve_reward_model.py: a reward model alone (rewards; values are zeros)."""
    _serve(cfg, schema, "rm_server", "rm")
