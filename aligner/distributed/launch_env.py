"""Work out rank, world size and rendezvous address from whichever launcher started us.

Pure functions over an environment mapping, so each launcher's variables are unit-testable.
Precedence: torchrun (it sets RANK even inside a SLURM allocation) > SLURM srun > OpenMPI
mpirun > MPICH/PMI > a single process.
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


def _slurm_tasks_per_node(env: Mapping[str, str], world_size: int) -> int:
    # SLURM_TASKS_PER_NODE looks like '4(x2),3'; the local count is on SLURM_LOCALID's node.
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        first = re.match(r"(\d+)", spec)
        if first:
            return int(first.group(1))
    return world_size


def default_port_for_job(job_id: str | None) -> int:
    """A deterministic rendezvous port so every task of one SLURM job agrees without talking."""
    if job_id and job_id.isdigit():
        return 15000 + int(job_id) % 20000
    return 29500


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
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_NTASKS" in env):
        world = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
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
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        return LaunchEnv(
            launcher="openmpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
            local_world_size=(
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world
            ),
            # mpirun does not provide a rendezvous address; multi-node runs export MASTER_ADDR.
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world = _int(env, "PMI_SIZE")
        return LaunchEnv(
            launcher="pmi",
            rank=_int(env, "PMI_RANK"),
            world_size=world,
            local_rank=_int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0,
            local_world_size=_int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    return LaunchEnv(
        launcher="single",
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port(),
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
