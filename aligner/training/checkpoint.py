"""Native (resumable) checkpoints: complete or absent, never half-written.

Layout of one checkpoint, `<dir>/step_0000042/`:
  weights/            megatron dist_checkpointing of model + optimizer (reshardable across TP/PP/DP)
  trainer_state.json  step, data position, LR-scheduler state, model config, run metadata
  rng/rank_00000.pt   every RNG stream of each rank (python, torch, CUDA, megatron TP tracker)
  COMPLETE            written last, before the directory gets its final name

Saving writes `step_N.partial/`, and only after every rank has finished does rank 0 add the
marker and rename it, so an interruption at any moment leaves the last good checkpoint intact.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aligner.faults import fault_point

log = logging.getLogger("aligner.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_complete(root: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(root: str | os.PathLike) -> Path | None:
    complete = list_complete(root)
    return complete[-1][1] if complete else None


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this rank (python, numpy, torch, CUDA, megatron's TP tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model, optimizer, is_loading: bool, skip_prefixes: tuple[str, ...] = ()) -> dict:
    from aligner.models.gpt import unwrap

    model_sd = unwrap(model).sharded_state_dict()
    if skip_prefixes:
        model_sd = {k: v for k, v in model_sd.items() if not k.startswith(skip_prefixes)}
    state = {"model": model_sd}
    if optimizer is not None:
        if getattr(optimizer.config, "use_distributed_optimizer", False):
            if is_loading:
                _allocate_empty_adam_state(optimizer)
            # The default layout fails on this megatron version; dp_reshardable round-trips.
            state["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
            )
        else:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def _torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The inner optimizers that are torch's own Adam/AdamW (what megatron uses without apex or
    transformer-engine); fused apex/TE optimizers keep their step in the param groups instead."""
    from aligner.training.offload import torch_optimizers

    return [inner for inner in torch_optimizers(optimizer) if isinstance(inner, torch.optim.Adam)]


def _allocate_empty_adam_state(optimizer) -> None:
    """Zero Adam moments and step 0 for every parameter of a fresh distributed optimizer.

    Megatron 0.16's DistributedOptimizer builds its loading template from its own state_dict(),
    which with torch's Adam reads every parameter's ``step``: on an optimizer that has not
    stepped yet there is none, and the load fails on an assertion. The values are placeholders
    that the load overwrites; no parameter is touched (a zero-gradient step would apply AdamW's
    weight decay).
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step tensor, valued at its group's saved step, after a
    distributed-optimizer load.

    Megatron 0.16 records the step in the saved param groups, but after its load torch Adam's
    per-parameter steps are not the saved value (observed: every parameter at step 0 after
    loading a step-2 checkpoint, so step 3 used step-1 bias corrections and was off by 5.8e-4;
    the DP=2 -> DP=1 resume test catches it), and where megatron does set them it shares one
    tensor among all parameters, which each update would increment once per parameter.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param, {})
                if "step" in state:
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def _model_parallel_sizes() -> list[int]:
    """[tensor-parallel, pipeline-parallel] sizes of this run."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return [1, 1]
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()]


def _distributed_optimizer_dp(optimizer) -> int | None:
    """The data-parallel size a distributed optimizer shards its state over; None otherwise."""
    if optimizer is None or not getattr(optimizer.config, "use_distributed_optimizer", False):
        return None
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def optimizer_has_state(optimizer) -> bool:
    """Adam moments exist only after the first step; a step-0 checkpoint has none to save."""
    from aligner.training.offload import torch_optimizers

    return optimizer is not None and any(len(opt.state) > 0 for opt in torch_optimizers(optimizer))


def save(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict, keep_last: int | None = 2) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    from aligner.compat import child_processes

    child_processes.install()  # megatron's writer processes must not outlive us

    if not optimizer_has_state(optimizer):
        optimizer = None

    root = Path(root)
    final = root / step_dir_name(step)
    partial = root / (step_dir_name(step) + ".partial")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "weights").mkdir(parents=True)
        (partial / "rng").mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(partial / "weights"))
    torch.save(rng_state(), partial / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    fault_point("checkpoint.before_commit")
    if _rank() == 0:
        _write_json_atomic(partial / STATE_FILE, {**trainer_state, "step": step,
                                                  "has_optimizer_state": optimizer is not None,
                                                  "distributed_optimizer_dp": _distributed_optimizer_dp(optimizer),
                                                  "model_parallel": _model_parallel_sizes()})
        (partial / MARKER).write_text("ok\n")
        _fsync_dir(partial)
        if final.exists():  # re-saving the same step: replace only after the new one is whole
            stale = root / (final.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(partial, final)
        _fsync_dir(root)
        if keep_last:
            for _, old in list_complete(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    check_complete(path)
    try:
        return json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / STATE_FILE}: not valid JSON ({exc})") from exc


def check_complete(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted while saving. "
            f"Use an earlier checkpoint from {path.parent}"
        )
    for needed in (STATE_FILE, "weights"):
        if not (path / needed).exists():
            raise CheckpointError(f"checkpoint {path} is missing {needed}")


def load(path: str | os.PathLike, model, optimizer=None, load_rng: bool = True,
         skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Collective: restore weights (+ optimizer state, + this rank's RNG). Returns trainer state.

    `skip_prefixes` leaves those parameters as initialised (e.g. a fresh value head on an SFT trunk).
    """
    from megatron.core import dist_checkpointing

    from aligner.models.gpt import unwrap

    path = Path(path)
    state = read_trainer_state(path)
    if not state.get("has_optimizer_state", False):
        optimizer = None  # e.g. a step-0 checkpoint: the optimizer starts fresh, as it did then
    saved_dp, dp = state.get("distributed_optimizer_dp"), _distributed_optimizer_dp(optimizer)
    if optimizer is not None and bool(saved_dp) != bool(dp):
        raise CheckpointError(
            f"{path}: its optimizer state was saved by "
            f"{'the distributed optimizer at data-parallel size ' + str(saved_dp) if saved_dp else 'a plain optimizer'}"
            f" and this run has {'the distributed optimizer at data-parallel size ' + str(dp) if dp else 'a plain one'}"
            ": a distributed optimizer's state resumes only with model.optim.name=distributed_fused_adam (at any "
            "data-parallel size), a plain optimizer's only without it (load weights only: "
            "pretrained_checkpoint.restore_from_path)")
    saved_mp = state.get("model_parallel")
    if optimizer is not None and saved_dp and saved_mp and list(saved_mp) != _model_parallel_sizes():
        tp, pp = saved_mp
        raise CheckpointError(
            f"{path}: its distributed-optimizer state was saved at model.tensor_model_parallel_size={tp}, "
            f"model.pipeline_model_parallel_size={pp} and megatron reshards it only across data-parallel sizes: "
            f"resume at TP={tp}, PP={pp} (load weights only: pretrained_checkpoint.restore_from_path)")
    try:
        loaded = dist_checkpointing.load(
            _sharded_state(model, optimizer, is_loading=True, skip_prefixes=skip_prefixes), str(path / "weights")
        )
    except Exception as exc:
        raise CheckpointError(
            f"could not load weights from {path / 'weights'}: {exc}. Is it a checkpoint of the same "
            f"model architecture (model.arch_config)?"
        ) from exc
    missing, unexpected = unwrap(model).load_state_dict(loaded["model"], strict=not skip_prefixes)
    left_out = [k for k in missing if not k.startswith(skip_prefixes) and not k.endswith("_extra_state")]
    if left_out or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {left_out[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of leaves: in-place copy needs no_grad
            optimizer.load_state_dict(loaded["optimizer"])
        if saved_dp:
            _restore_adam_steps(optimizer)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def load_weights_only(path: str | os.PathLike, model, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Initialise a model from a native checkpoint (e.g. SFT -> RM), ignoring optimizer and RNG."""
    return load(path, model, optimizer=None, load_rng=False, skip_prefixes=skip_prefixes)


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
