"""Rank/world/rendezvous from each launcher's environment variables."""
import pytest

from aligner.distributed.launch_env import LaunchEnvError, detect_launch_env, expand_slurm_nodelist
from aligner.distributed.setup import ParallelConfigError, check_parallel_sizes


def test_torchrun_variables():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("torchrun", 3, 8, 1, 2)
    assert (env.master_addr, env.master_port) == ("node7", 29400)  # torchrun wins inside a SLURM allocation


def test_slurm_variables_and_nodelist():
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                             "SLURM_STEP_NODELIST": "gpu[07-08,11],login1", "SLURM_JOB_ID": "123456",
                             "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert env.master_addr == "gpu07"
    assert env.master_port == 15000 + 123456 % 20000


def test_slurm_respects_exported_master():
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                             "MASTER_ADDR": "head", "MASTER_PORT": "1234", "SLURM_JOB_NODELIST": "a1"})
    assert (env.master_addr, env.master_port) == ("head", 1234)


def test_expand_nodelist_forms():
    assert expand_slurm_nodelist("n1") == ["n1"]
    assert expand_slurm_nodelist("gpu[01-03]") == ["gpu01", "gpu02", "gpu03"]
    assert expand_slurm_nodelist("a[1,3-4],b2") == ["a1", "a3", "a4", "b2"]


def test_openmpi_variables():
    env = detect_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("openmpi", 2, 4, 0, 2)
    assert env.master_addr == "127.0.0.1"


def test_pmi_variables():
    env = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (env.launcher, env.rank, env.world_size) == ("pmi", 1, 2)


def test_single_process_defaults():
    env = detect_launch_env({})
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)
    assert 0 < env.master_port < 65536


def test_bad_integer_is_named():
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE='two'"):
        detect_launch_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_parallel_sizes_must_divide_world():
    assert check_parallel_sizes(8, 2, 2) == 2
    with pytest.raises(ParallelConfigError, match="model.tensor_model_parallel_size"):
        check_parallel_sizes(6, 4, 1)
