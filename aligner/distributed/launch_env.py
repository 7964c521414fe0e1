"""Work out rank, world size and rendezvous address from whichever launcher started us.

Pure functions over an environment mapping, so each launcher's variables are unit-testable.
Precedence: torchrun (it sets RANK even inside a SLURM allocation) > OpenMPI mpirun (inside an
allocation its processes also carry SLURM variables, with SLURM_PROCID=0 everywhere) > SLURM
srun > MPICH/PMI > a single process.

A launch that cannot work fails here, at once, naming the variable, instead of waiting for the
rendezvous timeout: a SLURM allocation of several tasks entered without srun (the batch script
or an salloc shell running python directly), and a multi-node MPI launch without MASTER_ADDR.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "torchrun" | "slurm" | "openmpi" | "pmi" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


class LaunchEnvError(RuntimeError):
    pass


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise LaunchEnvError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list, e.g. 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compact task counts, e.g. '4(x2),3' -> [4, 4, 3] (one entry per node)."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LaunchEnvError(f"cannot parse SLURM tasks-per-node {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _slurm_tasks_per_node(env: Mapping[str, str], world_size: int) -> int:
    # The step's own layout first: inside `srun --ntasks=1` the job's SLURM_NTASKS_PER_NODE (8, say)
    # is still exported, but this step has one task on this node.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = expand_tasks_per_node(env[key])
            node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            return counts[node] if node < len(counts) else counts[0]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return world_size


# Step ids SLURM gives to what is not an srun task: the batch script, the extern step, an
# interactive salloc shell (SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT, SLURM_INTERACTIVE_STEP).
_NON_TASK_STEP_IDS = {"batch", "extern", "interactive", "4294967294", "4294967295", "4294967293"}


def slurm_step_id(env: Mapping[str, str]) -> str | None:
    """The srun step this process is a task of, or None (batch script, salloc shell, ssh)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or step.strip().lower() in _NON_TASK_STEP_IDS:
        return None
    return step


def default_port_for_job(job_id: str | None) -> int:
    """A deterministic rendezvous port so every task of one SLURM job agrees without talking.

    Below Linux's ephemeral range (32768+), and 8 apart per job so that a job using
    port, port+1, port+2 (the PPO het job: critic and actor groups) never meets the next jobs.
    """
    if job_id and job_id.isdigit():
        return 20000 + (int(job_id) % 1500) * 8
    return 29500


def _require_master_for_multinode(env: Mapping[str, str], launcher: str, world: int, local: int,
                                  size_key: str, local_key: str) -> None:
    if world > local and not env.get("MASTER_ADDR"):
        raise LaunchEnvError(
            f"{launcher}: {size_key}={world} processes but {local_key}={local} on this node, so the run spans "
            f"nodes, and MASTER_ADDR is not set. Export the first node's address to every rank "
            f"(mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port>); 127.0.0.1 would make each node wait "
            f"for ranks that never arrive."
        )


def detect_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return LaunchEnv(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world
        # mpirun does not provide a rendezvous address; multi-node runs must export MASTER_ADDR.
        _require_master_for_multinode(env, "OpenMPI", world, local, "OMPI_COMM_WORLD_SIZE",
                                      "OMPI_COMM_WORLD_LOCAL_SIZE")
        return LaunchEnv(
            launcher="openmpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
            local_world_size=local,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env or "SLURM_NTASKS" in env):
        if slurm_step_id(env) is None:
            # The batch script itself (or an salloc shell) also has SLURM_PROCID=0 and the job's
            # SLURM_NTASKS, but no srun step: the other ranks would never start.
            tasks = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
            if tasks > 1:
                raise LaunchEnvError(
                    f"inside SLURM job {env.get('SLURM_JOB_ID', '?')} with SLURM_NTASKS={tasks}, but this process "
                    f"is not an srun task (SLURM_STEP_ID is not set: it is the batch script or an salloc shell), "
                    f"so the other {tasks - 1} rank(s) would never start. Launch with `srun python ...` "
                    f"(see scripts/slurm/), or `srun --ntasks=1 ...` / unset SLURM_NTASKS for one process."
                )
            return _single(env)
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else (
            _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = expand_slurm_nodelist(nodelist) if nodelist else []
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port_for_job(env.get("SLURM_JOB_ID"))
        return LaunchEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=_slurm_tasks_per_node(env, world),
            master_addr=master,
            master_port=port,
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world = _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        _require_master_for_multinode(env, "MPI (PMI)", world, local, "PMI_SIZE", "MPI_LOCALNRANKS")
        return LaunchEnv(
            launcher="pmi",
            rank=_int(env, "PMI_RANK"),
            world_size=world,
            local_rank=_int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0,
            local_world_size=local,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    return _single(env)


def _single(env: Mapping[str, str]) -> LaunchEnv:
    return LaunchEnv(
        launcher="single",
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port(),
    )


# Variables by which a launcher says this process was given GPUs: device lists (CUDA's, and
# SLURM's indices of allocated GPUs) and SLURM's requested counts ("8", "a100:8", "0").
GPU_DEVICE_LISTS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")


def requested_gpus(env: Mapping[str, str]) -> str | None:
    """'VARIABLE=value' for the first variable that gives this process GPUs, else None.

    Empty values, zero counts and CUDA's ways of hiding every device ('-1', 'NoDevFiles')
    request nothing.
    """
    for key in GPU_DEVICE_LISTS:
        value = env.get(key, "").strip()
        if value and value.lower() not in ("-1", "nodevfiles", "none", "n/a"):
            return f"{key}={value}"
    for key in GPU_COUNTS:
        value = env.get(key, "").strip()
        counts = [item.rsplit(":", 1)[-1] for item in value.split(",")]
        if any(count.isdigit() and int(count) > 0 for count in counts):
            return f"{key}={value}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
