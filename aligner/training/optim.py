"""megatron-core DDP + optimizer + LR schedule from NeMo-style config keys.

Keys read (NeMo-Aligner spellings): model.optim.{name, lr, weight_decay, betas, eps,
sched.{name, warmup_steps, min_lr, max_steps}} and the trainer's
gradient_clip_val.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

_OPTIMIZER_NAMES = {"adam": False, "adamw": False, "fused_adam": False, "distributed_fused_adam": True}
_SCHEDULES = {"cosineannealing": "cosine", "cosine": "cosine", "constant": "constant", "linear": "linear",
              "warmupannealing": "linear", "inverse-square-root": "inverse-square-root"}


class OptimConfigError(ValueError):
    pass


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    decay_style: str
    max_steps: int
    clip_grad: float
    distributed: bool

    @classmethod
    def from_config(cls, optim: Mapping[str, Any], max_steps: int, gradient_clip_val: float | None) -> "OptimSettings":
        name = str(optim.get("name", "adam")).lower()
        if name not in _OPTIMIZER_NAMES:
            raise OptimConfigError(f"model.optim.name: unsupported optimizer {name!r}; use one of {sorted(_OPTIMIZER_NAMES)}")
        sched = dict(optim.get("sched") or {})
        sched_name = str(sched.get("name", "CosineAnnealing")).lower()
        if sched_name not in _SCHEDULES:
            raise OptimConfigError(f"model.optim.sched.name: unsupported schedule {sched.get('name')!r}; "
                                   f"use one of CosineAnnealing, Constant, Linear")
        betas = tuple(float(b) for b in optim.get("betas", (0.9, 0.98)))
        if len(betas) != 2:
            raise OptimConfigError(f"model.optim.betas: expected two numbers, got {list(betas)}")
        lr = float(optim.get("lr", 1e-4))
        if lr <= 0:
            raise OptimConfigError(f"model.optim.lr: must be > 0, got {lr}")
        warmup = int(sched.get("warmup_steps", 0) or 0)
        decay_steps = int(sched.get("max_steps", max_steps) or max_steps)
        return cls(
            lr=lr,
            min_lr=float(sched.get("min_lr", 0.0) or 0.0),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            betas=(betas[0], betas[1]),
            eps=float(optim.get("eps", 1e-8)),
            warmup_steps=warmup,
            decay_style=_SCHEDULES[sched_name],
            max_steps=max(decay_steps, warmup + 1),
            clip_grad=float(gradient_clip_val or 0.0),
            distributed=_OPTIMIZER_NAMES[name],
        )


def wrap_data_parallel(model, settings: OptimSettings):
    """megatron DDP: contiguous grad buffers, fp32 grad reduction, DP all-reduce at step end."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=settings.distributed,
    )
    wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    wrapped.config.finalize_model_grads_func = finalize_model_grads
    wrapped.config.no_sync_func = wrapped.no_sync
    return wrapped


def build_optimizer(ddp_model, settings: OptimSettings, dtype: torch.dtype):
    """megatron optimizer (bf16 keeps fp32 main params) and its warmup + decay scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_eps=settings.eps,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=settings.distributed,
        clip_grad=settings.clip_grad,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    decay_style = settings.decay_style
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.warmup_steps else settings.lr,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=settings.max_steps,
        lr_decay_style=decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=settings.max_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def load_scheduler_state(scheduler, state: Mapping[str, Any]) -> None:
    """Set the LR/WD schedule to a checkpoint's position. Megatron's load_state_dict *adds* the
    saved step count to the current one, which is only right on a fresh scheduler; rewinding a
    live one (a critic restoring an older checkpoint) must start the count from zero."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)
