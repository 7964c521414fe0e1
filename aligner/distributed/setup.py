"""Start torch.distributed and megatron's parallel_state from the launcher's environment.

gloo on CPU, NCCL on GPU; the same call serves torchrun, SLURM, mpirun and a bare `python`.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aligner.compat import megatron_cpu
from aligner.distributed.launch_env import LaunchEnv, detect_launch_env

log = logging.getLogger("aligner.distributed")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    launcher: str
    device: torch.device

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0


class ParallelConfigError(ValueError):
    pass


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or explain which config keys do not fit the world size."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(
            f"model.tensor_model_parallel_size={tp} and model.pipeline_model_parallel_size={pp} must be >= 1"
        )
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} (trainer.devices x trainer.num_nodes) is not divisible by "
            f"model.tensor_model_parallel_size ({tp}) x model.pipeline_model_parallel_size ({pp})"
        )
    return world_size // (tp * pp)


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
    env: dict | None = None,
) -> ParallelLayout:
    """Initialise the process group (if needed), megatron's model-parallel groups and RNG."""
    from megatron.core import parallel_state

    launch: LaunchEnv = detect_launch_env(os.environ if env is None else env)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        megatron_cpu.install()
    else:
        torch.cuda.set_device(launch.local_rank % max(torch.cuda.device_count(), 1))

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    dp = check_parallel_sizes(world, tensor_parallel, pipeline_parallel)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )
    seed_everything(seed)
    layout = ParallelLayout(
        world_size=world,
        rank=dist.get_rank(),
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        data_parallel=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        launcher=launch.launcher,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
    )
    if layout.rank == 0:
        log.info(
            "distributed: launcher=%s world=%d tp=%d pp=%d dp=%d backend=%s",
            launch.launcher, world, tensor_parallel, pipeline_parallel, dp, dist.get_backend(),
        )
    return layout


def seed_everything(seed: int) -> None:
    """Same seed on every rank for replicated params; megatron offsets the tensor-parallel stream."""
    import random

    from megatron.core import tensor_parallel as mtp

    random.seed(seed)
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:  # torch.manual_seed would call the patched cuda seeding; seed the CPU generator directly
        torch.default_generator.manual_seed(seed)
    mtp.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel group (in place); identity for a single replica."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor
