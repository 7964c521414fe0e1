"""scripts/slurm/*.sbatch under a real SLURM (Debian's slurm-wlm 22.05: munge, slurmctld, two slurmd).

The cluster is brought up in a temporary directory (tests/integration/slurm_cluster.py) and the
batch scripts are submitted unchanged with `sbatch`, from a directory that is not the checkout
(ALIGNER_DIR, RESULTS and PYTHON in the environment, as the README says), on tiny configs:
- sft.sbatch with 2 tasks (srun rendezvous, data parallel over gloo), then rm.sbatch and
  dpo.sbatch from its checkpoint, then ppo_het.sbatch (critic in het group 0, actor in group 1);
  each must end COMPLETED with exit 0 and leave a checkpoint;
- ppo_het.sbatch whose actor fails: the job's exit status is the actor's, and the critic has
  been stopped (its srun ended, ready file removed) by the script's trap;
- python started directly in a 2-task batch script (no srun) fails at once naming SLURM_NTASKS
  (the environment a real batch step has, not a hand-written one).
GPUs: the scripts ask for 8 per node; the submissions override it with --gpus-per-node=0 (these
nodes have none, and a GPU request without CUDA is refused by aligner).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, loopback_node_names, missing_binaries
from tests.launch import REPO

SLURM_DIR = REPO / "scripts" / "slurm"
_missing = missing_binaries()
_nodes = loopback_node_names()
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"SLURM cannot be installed here: {', '.join(_missing)} not found "
                       "(scripts/install.sh installs slurmctld slurmd slurm-client munge from Debian where apt works)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="SLURM test cluster needs root (slurmd runs jobs as their user)"),
    pytest.mark.skipif(not _nodes, reason="this host has fewer than two names that resolve (hostname, localhost) "
                       "for the two virtual SLURM nodes"),
    pytest.mark.timeout(1200),  # the module's jobs run once, in the first test's fixtures
]

TINY = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
        "model.num_query_groups=null", "model.micro_batch_size=2", "model.global_batch_size=4",
        "model.encoder_seq_length=32", "exp_manager.create_tensorboard_logger=false"]
TINY_ACTOR = ["model.micro_batch_size=4", "model.global_batch_size=4", "model.ppo.num_rollout_samples=4",
              "model.ppo.rollout_micro_batch_size=4", "model.ppo.forward_micro_batch_size=4",
              "model.ppo.length_params.max_length=4", "model.ppo.length_params.min_length=4",
              "model.ppo.use_is_end_mask=false", "trainer.ppo.val_check_interval=0", "trainer.ppo.save_interval=2",
              "trainer.ppo.max_steps=2", "exp_manager.create_tensorboard_logger=false",
              "remote_critic_rm.total_timeout_s=300"]
CRITIC_ARGS = "trainer.ppo.max_steps=2 exp_manager.create_tensorboard_logger=false"
NO_GPUS = ["--gpus-per-node=0"]


def _small_data(root: Path) -> Path:
    """The movie-review data (its prep script), cut to a few hundred lines so that start-up is quick."""
    import subprocess

    from tests.launch import child_env

    full = root / "full"
    subprocess.run([sys.executable, "-m", "aligner.data.prep.movie_reviews", "--output-dir", str(full)], check=True,
                   env=child_env(), cwd=str(REPO), capture_output=True, timeout=600)
    small = root / "small"
    shutil.copytree(full / "tokenizer", small / "tokenizer")
    for path in full.glob("*.jsonl"):
        lines = path.read_text().splitlines(keepends=True)
        (small / path.name).write_text("".join(lines[:200]))
    return small


def _data(data: Path, kind: str) -> list[str]:
    return [f"model.tokenizer.model={data / 'tokenizer'}", f"model.data.train_ds.file_path={data / f'{kind}_train.jsonl'}",
            f"model.data.validation_ds.file_path={data / f'{kind}_val.jsonl'}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(root / "cluster", _nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Every submission at once (dependencies order them); the fields of each finished job."""
    started = time.monotonic()
    work = tmp_path_factory.mktemp("slurm_work")  # the submit directory: not the checkout
    data = _small_data(tmp_path_factory.mktemp("slurm_data"))
    results, failing = work / "results", work / "failing_results"
    env = dict(ALIGNER_DIR=str(REPO), RESULTS=str(results), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               ALIGNER_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def submit(script: str, options: list[str], overrides: list[str] = (), **extra: str) -> int:
        return cluster.sbatch([*options, str(SLURM_DIR / script), *overrides], cwd=work, **{**env, **extra})

    ids = {}
    ids["sft"] = submit("sft.sbatch", ["--ntasks-per-node=2", *NO_GPUS], [
        *_data(data, "sft"), *TINY, "trainer.sft.max_steps=2", "trainer.sft.val_check_interval=0",
        "trainer.sft.save_interval=2"])
    after_sft = [f"--dependency=afterok:{ids['sft']}", "--ntasks-per-node=1", *NO_GPUS]
    for name, script, algo in (("rm", "rm.sbatch", "rm"), ("dpo", "dpo.sbatch", "dpo")):
        ids[name] = submit(script, after_sft, [
            *_data(data, "comparisons"), "model.micro_batch_size=2", "model.global_batch_size=4",
            "model.encoder_seq_length=32", "exp_manager.create_tensorboard_logger=false",
            f"trainer.{algo}.max_steps=2", f"trainer.{algo}.val_check_interval=0", f"trainer.{algo}.save_interval=2"])
    het = ["--ntasks-per-node=1", *NO_GPUS, ":", "--ntasks-per-node=1", *NO_GPUS]
    ppo_overrides = [*_data(data, "prompts"), *TINY_ACTOR]
    ids["ppo"] = submit("ppo_het.sbatch", [f"--dependency=afterok:{ids['rm']}", *het], ppo_overrides,
                        CRITIC_ARGS=CRITIC_ARGS)
    # the same het job with an actor that fails at start-up (a misspelt key), writing elsewhere
    ids["ppo_failing"] = submit("ppo_het.sbatch", [f"--dependency=afterok:{ids['rm']}", *het],
                                [*ppo_overrides, "pretrained_checkpoint.restore_from_path=" + str(results / "sft"),
                                 "trainer.ppo.max_stepz=2"],
                                RESULTS=str(failing), CRITIC_ARGS=f"{CRITIC_ARGS} "
                                f"pretrained_checkpoint.restore_from_path={results / 'rm'}")
    # what initialize() reads first (tests/unit/test_launch_env.py runs initialize itself on this env)
    ids["no_srun"] = cluster.sbatch(["--ntasks=2", *NO_GPUS, "--output=no_srun-%j.out", "--wrap",
                                     f"{sys.executable} -c 'import os; from aligner.distributed.launch_env import "
                                     f"detect_launch_env; detect_launch_env(os.environ)'"],
                                    cwd=work, **env, PYTHONPATH=str(REPO))
    finished = cluster.wait(list(ids.values()), timeout=800)
    elapsed = time.monotonic() - started
    print(f"\nSLURM jobs finished in {elapsed:.0f}s (data prep included); run times: " + ", ".join(
        f"{name} {finished[job_id].get('RunTime')}" for name, job_id in ids.items()))
    outputs = {name: "\n".join(p.read_text(errors="replace") for p in work.glob(f"*-{job_id}.out"))
               for name, job_id in ids.items()}
    return {name: finished[job_id] for name, job_id in ids.items()}, outputs, results, failing, cluster


def _assert_ok(jobs, name: str) -> None:
    fields, outputs, *_, cluster = jobs
    job = fields[name]
    assert (job.get("JobState"), job.get("ExitCode")) == ("COMPLETED", "0:0"), (
        f"{name}: {job.get('JobState')} exit {job.get('ExitCode')} reason {job.get('Reason')}\n"
        f"{outputs[name][-6000:]}\n{cluster.logs(1500)}")


def _checkpoint(run: Path, step: int) -> Path:
    path = run / "checkpoints" / f"step_{step:07d}"
    assert (path / "trainer_state.json").is_file(), sorted(p.name for p in run.rglob("*"))[:50]
    return path


def test_sft_job_with_two_srun_tasks(jobs):
    _assert_ok(jobs, "sft")
    _, outputs, results, *_ = jobs
    state = json.loads((_checkpoint(results / "sft", 2) / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert "launcher=slurm world=2" in outputs["sft"]  # two srun tasks, one data-parallel group


def test_reward_model_job(jobs):
    _assert_ok(jobs, "rm")
    _checkpoint(jobs[2] / "rm", 2)


def test_dpo_job(jobs):
    _assert_ok(jobs, "dpo")
    _checkpoint(jobs[2] / "dpo", 2)


def test_ppo_het_job(jobs):
    _assert_ok(jobs, "ppo")
    _, outputs, results, *_ = jobs
    _checkpoint(results / "ppo_actor", 2)
    _checkpoint(results / "ppo_critic", 2)  # saved on the actor's request, over HTTP with the token
    out = outputs["ppo"]
    assert "critic ready at" in out and "actor exited with status 0" in out and "stopping the critic" in out
    assert "critic exited with status 0" in out  # stopped by SIGTERM to its tasks: a clean shutdown
    assert not list((results / "ppo_critic").glob("ready.*"))  # removed on the way out


def test_ppo_het_job_returns_the_actors_failure_and_stops_the_critic(jobs):
    fields, outputs, _, failing, _ = jobs
    job, out = fields["ppo_failing"], outputs["ppo_failing"]
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", (job, out[-4000:])
    assert "max_stepz" in out  # the actor's own error, named
    assert "critic ready at" in out and "stopping the critic" in out, out[-4000:]
    assert not list((failing / "ppo_critic").glob("ready.*"))


def test_python_without_srun_in_a_multi_task_allocation_fails_fast(jobs):
    fields, outputs, *_ = jobs
    assert fields["no_srun"]["JobState"] == "FAILED", outputs["no_srun"][-3000:]
    assert "SLURM_NTASKS=2" in outputs["no_srun"] and "srun" in outputs["no_srun"]
