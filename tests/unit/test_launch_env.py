"""Rank/world/rendezvous from each launcher's environment variables, and the launches that must
fail at once (naming the variable or key) instead of waiting for ranks that never come.

The SLURM environments below are the variables a real slurmd (22.05, tests/integration/
test_slurm_real.py) gives a batch script and an srun task."""
import time

import pytest

from aligner.distributed import setup as dist_setup
from aligner.distributed.launch_env import (LaunchEnvError, default_port_for_job, detect_launch_env,
                                            expand_slurm_nodelist, expand_tasks_per_node, requested_gpus)
from aligner.distributed.setup import (ParallelConfigError, check_cuda_for_gpus, check_launch_layout,
                                       check_parallel_sizes)

# What `sbatch --ntasks-per-node=2` gives the batch script (no SLURM_STEP_ID) ...
SLURM_BATCH = {"SLURM_JOB_ID": "7", "SLURM_JOBID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_NTASKS_PER_NODE": "2",
               "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "node1", "SLURM_NODELIST": "node1",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_PER_NODE": "0"}
# ... and what `srun --ntasks=1` inside it gives its task: the job's SLURM_NTASKS_PER_NODE stays 2.
SLURM_STEP_OF_ONE = {**SLURM_BATCH, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_NTASKS": "1",
                     "SLURM_NPROCS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
                     "SLURM_TASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "node1", "SLURM_STEP_NUM_NODES": "1"}


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
    assert env.master_port == default_port_for_job("123456")


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
                             "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("openmpi", 2, 4, 0, 4)
    assert env.master_addr == "127.0.0.1"  # one node: loopback is right


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


def test_slurm_step_uses_the_steps_task_counts():
    env = detect_launch_env(SLURM_STEP_OF_ONE)
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("slurm", 0, 1, 1)


def test_slurm_tasks_per_node_of_this_node():
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    env = detect_launch_env({"SLURM_PROCID": "9", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "11",
                             "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_LOCALID": "1",
                             "SLURM_STEP_NODELIST": "n[1-3]"})
    assert (env.world_size, env.local_world_size, env.master_addr) == (11, 3, "n1")


def test_rendezvous_ports_of_neighbouring_jobs_never_meet():
    ports = [default_port_for_job(str(job)) for job in range(1000, 1100)]
    used = [p + offset for p in ports for offset in (0, 1, 2)]  # the het job uses port, +1, +2
    assert len(set(used)) == len(used)
    assert all(1024 < p < 32768 for p in used)  # below Linux's ephemeral range


# -- fail fast: each case is an error naming the variable or key, within seconds

def test_slurm_allocation_without_srun_fails_naming_the_variables():
    with pytest.raises(LaunchEnvError, match="SLURM_NTASKS=2.*SLURM_STEP_ID") as err:
        detect_launch_env(SLURM_BATCH)
    assert "srun" in str(err.value)
    # the batch step's id, where a SLURM version exports one, is not an srun task either
    with pytest.raises(LaunchEnvError, match="SLURM_STEP_ID"):
        detect_launch_env({**SLURM_BATCH, "SLURM_STEP_ID": "4294967294"})


def test_slurm_allocation_of_one_task_runs_as_one_process():
    env = detect_launch_env({**SLURM_BATCH, "SLURM_NTASKS": "1"})
    assert (env.launcher, env.world_size) == ("single", 1)


def test_torchrun_and_mpirun_inside_an_allocation_are_not_mistaken_for_srun():
    torchrun = detect_launch_env({**SLURM_BATCH, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node1"})
    assert (torchrun.launcher, torchrun.rank) == ("torchrun", 1)
    # mpirun's processes inside an allocation also carry SLURM_PROCID=0 (one orted step per node)
    mpi = detect_launch_env({**SLURM_STEP_OF_ONE, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                             "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (mpi.launcher, mpi.rank, mpi.world_size) == ("openmpi", 1, 2)


def test_multinode_mpi_without_master_addr_fails():
    multi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(LaunchEnvError, match="OMPI_COMM_WORLD_SIZE=16.*OMPI_COMM_WORLD_LOCAL_SIZE=8.*MASTER_ADDR"):
        detect_launch_env(multi)
    assert detect_launch_env({**multi, "MASTER_ADDR": "head"}).master_addr == "head"
    with pytest.raises(LaunchEnvError, match="PMI_SIZE=4.*MASTER_ADDR"):
        detect_launch_env({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"})


def test_gpu_request_variables():
    assert requested_gpus({}) is None
    assert requested_gpus({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert requested_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) is None
    assert requested_gpus({"SLURM_GPUS_PER_NODE": "0"}) is None  # sbatch --gpus-per-node=0
    assert requested_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == "CUDA_VISIBLE_DEVICES=0,1"
    assert requested_gpus({"SLURM_GPUS_PER_NODE": "a100:8"}) == "SLURM_GPUS_PER_NODE=a100:8"
    assert requested_gpus({"SLURM_GPUS_ON_NODE": "4"}) == "SLURM_GPUS_ON_NODE=4"
    assert requested_gpus({"SLURM_JOB_GPUS": "2,3"}) == "SLURM_JOB_GPUS=2,3"


def test_gpus_given_but_no_cuda_fails_naming_the_variable():
    with pytest.raises(ParallelConfigError, match="SLURM_GPUS_PER_NODE=8.*torch.cuda.is_available"):
        check_cuda_for_gpus({"SLURM_GPUS_PER_NODE": "8"}, cuda_available=False)
    check_cuda_for_gpus({"SLURM_GPUS_PER_NODE": "8"}, cuda_available=True)
    check_cuda_for_gpus({"SLURM_GPUS_PER_NODE": "8", "ALIGNER_ALLOW_CPU": "1"}, cuda_available=False)
    check_cuda_for_gpus({}, cuda_available=False)


def _launch(world, launcher="torchrun", local=None):
    return detect_launch_env({"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(local or world)}) \
        if launcher == "torchrun" else detect_launch_env({})


def test_devices_times_nodes_must_be_the_world_size():
    with pytest.raises(ParallelConfigError, match=r"trainer.devices=8 x trainer.num_nodes=1 = 8.*world size of 2"):
        check_launch_layout(8, 1, _launch(2))
    with pytest.raises(ParallelConfigError, match=r"trainer.devices=2 x trainer.num_nodes=2 = 4.*world size of 8"):
        check_launch_layout(2, 2, _launch(8))
    check_launch_layout(4, 2, _launch(8))
    with pytest.raises(ParallelConfigError, match="trainer.devices='eight'"):
        check_launch_layout("eight", 1, _launch(8))


def test_devices_semantics_where_the_config_says_nothing():
    check_launch_layout(1, 1, _launch(8))  # the YAML defaults: the launcher's layout
    check_launch_layout("auto", 2, _launch(8))
    check_launch_layout(-1, None, _launch(8))
    check_launch_layout(None, None, _launch(8))
    check_launch_layout(8, 1, _launch(1, launcher="single"))  # NeMo tutorial style: one process, warned


def _initialize_fails_fast(env, match, tp=1, **kwargs):
    start = time.monotonic()
    with pytest.raises((LaunchEnvError, ParallelConfigError), match=match):
        dist_setup.initialize(tp, 1, env=env, timeout_minutes=0.1, **kwargs)
    assert time.monotonic() - start < 10  # not the rendezvous timeout


def test_initialize_fails_before_any_rendezvous():
    _initialize_fails_fast(SLURM_BATCH, "SLURM_NTASKS=2")
    _initialize_fails_fast({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
                            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "MASTER_ADDR")
    _initialize_fails_fast({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"},
                           "trainer.devices=4", devices=4, num_nodes=1)
    _initialize_fails_fast({"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"},
                           "model.tensor_model_parallel_size", tp=2, devices=None)


@pytest.mark.skipif(dist_setup.torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_initialize_with_gpus_but_no_cuda_fails():
    _initialize_fails_fast({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0")
