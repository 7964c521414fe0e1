"""Run a test script under a real launcher (torchrun, mpirun) as separate processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from aligner.distributed.launch_env import free_port

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "SLURM_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", ALIGNER_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def python_command(script: str | Path, args: list[str] = (), nproc: int = 1,
                   use_torchrun: bool | None = None) -> list[str]:
    """`python script args`, under torchrun with nproc processes (by default when nproc > 1)."""
    if use_torchrun is None:
        use_torchrun = nproc > 1
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [sys.executable, *(launcher if use_torchrun else []), str(script), *map(str, args)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child and, when it leads its own session (a torchrun launcher started with
    start_new_session=True), every worker under it: a killed launcher must not orphan ranks."""
    import signal

    if proc.poll() is not None:
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def torchrun(script: str | Path, args: list[str] = (), nproc: int = 2, timeout: float = 300,
             cwd: str | Path | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = python_command(script, args, nproc, use_torchrun=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(**env),
                          cwd=str(cwd or REPO))


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def check(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc.stdout
