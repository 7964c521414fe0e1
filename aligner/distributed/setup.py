"""Start torch.distributed and megatron's parallel_state from the launcher's environment.

gloo on CPU, NCCL on GPU; the same call serves torchrun, SLURM, mpirun and a bare `python`.
Before any rendezvous (which would wait `timeout_minutes` for ranks that never come), the
launch is checked: launcher variables (launch_env), GPUs given but CUDA missing, and the
config's trainer.devices x trainer.num_nodes against the launcher's world size.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aligner.compat import megatron_cpu
from aligner.distributed.launch_env import LaunchEnv, detect_launch_env, requested_gpus

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
            f"world size {world_size} (the processes the launcher started) is not divisible by "
            f"model.tensor_model_parallel_size ({tp}) x model.pipeline_model_parallel_size ({pp})"
        )
    return world_size // (tp * pp)


def check_expert_parallel(ep: int, data_parallel: int) -> None:
    """Experts are split over the data-parallel ranks (megatron's expert-data-parallel groups are
    what is left): EP must divide the data-parallel size."""
    if ep < 1 or data_parallel % ep:
        raise ParallelConfigError(
            f"model.expert_model_parallel_size={ep} must be >= 1 and divide the data-parallel size {data_parallel} "
            "(world size / (model.tensor_model_parallel_size x model.pipeline_model_parallel_size))"
        )


# trainer.devices values that mean "as many as the launcher started" (NeMo/Lightning spellings).
_AUTO_DEVICES = (None, "auto", -1, "-1")
ALLOW_CPU_ENV = "ALIGNER_ALLOW_CPU"


def _as_count(value, key: str) -> int | None:
    if value in _AUTO_DEVICES:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ParallelConfigError(f"{key}={value!r} must be an integer (or 'auto')") from None
    if count < 1:
        raise ParallelConfigError(f"{key}={value!r} must be >= 1 (or 'auto')")
    return count


def check_launch_layout(devices, num_nodes, launch: LaunchEnv) -> None:
    """trainer.devices x trainer.num_nodes must be the world size the launcher started.

    The processes are started by the launcher (torchrun, srun, mpirun), never by us, so the
    config can only be checked against them, and only where it says something:
    - a single process without a launcher (`python train.py trainer.devices=8`, as NeMo
      tutorials write it) is not checked: nothing here would start the other 7; a warning says so;
    - `auto`, -1 or null, and the YAML defaults devices=1 x num_nodes=1, mean "whatever the
      launcher started", so `torchrun --nproc_per_node 2 train.py` needs no trainer.* overrides;
    - any other integers must multiply to the launcher's world size (the SLURM scripts pass
      trainer.devices=$SLURM_NTASKS_PER_NODE trainer.num_nodes=$SLURM_JOB_NUM_NODES).
    """
    per_node = _as_count(devices, "trainer.devices")
    nodes = _as_count(num_nodes, "trainer.num_nodes")
    if per_node is None or (per_node, nodes or 1) == (1, 1):
        return
    expected = per_node * (nodes or 1)
    if launch.launcher == "single":
        if expected != 1:
            log.warning("trainer.devices=%s x trainer.num_nodes=%s asks for %d processes, but this is one process "
                        "started without a launcher; start them with torchrun, srun or mpirun", devices,
                        num_nodes, expected)
        return
    if expected != launch.world_size:
        raise ParallelConfigError(
            f"trainer.devices={per_node} x trainer.num_nodes={nodes or 1} = {expected} processes, but {launch.launcher} "
            f"started a world size of {launch.world_size} ({launch.local_world_size} on this node). Make them agree "
            f"(or leave trainer.devices=1 trainer.num_nodes=1 to take the launcher's layout)."
        )


def check_cuda_for_gpus(env, cuda_available: bool) -> None:
    """GPUs given to this process but no usable CUDA: stop instead of silently training on CPU."""
    given = requested_gpus(env)
    if given is None or cuda_available or env.get(ALLOW_CPU_ENV, "") not in ("", "0"):
        return
    raise ParallelConfigError(
        f"{given} gives this process GPUs, but torch.cuda.is_available() is False (torch {torch.__version__}, "
        f"CUDA build {torch.version.cuda}). Install a CUDA build of torch / check the driver and container "
        f"(--container-image, nvidia runtime), or set {ALLOW_CPU_ENV}=1 to run on CPU anyway."
    )


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
    env: dict | None = None,
    devices=None,
    num_nodes=None,
    expert_parallel: int = 1,
) -> ParallelLayout:
    """Initialise the process group (if needed), megatron's model-parallel groups and RNG.

    `devices`, `num_nodes`: the config's trainer.devices / trainer.num_nodes, checked against the
    launcher's world size before the rendezvous (see check_launch_layout); None skips the check.
    """
    env = os.environ if env is None else env
    launch: LaunchEnv = detect_launch_env(env)
    use_cuda = torch.cuda.is_available()
    check_cuda_for_gpus(env, use_cuda)
    check_launch_layout(devices, num_nodes, launch)
    if not dist.is_initialized():
        check_parallel_sizes(launch.world_size, tensor_parallel, pipeline_parallel)
    from megatron.core import parallel_state
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
    check_expert_parallel(expert_parallel, dp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
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
            "distributed: launcher=%s world=%d tp=%d pp=%d dp=%d ep=%d backend=%s",
            launch.launcher, world, tensor_parallel, pipeline_parallel, dp, expert_parallel, dist.get_backend(),
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
