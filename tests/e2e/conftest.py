"""Shared fixtures for end-to-end runs on the embedded movie-review data.

The data is prepared once per session from the real vaderSentiment 3.3.2 source distribution;
SFT runs once and later stages (RM, DPO, PPO) start from it, as in the README pipeline.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, child_env, kill_tree, python_command

SCRIPTS = REPO / "examples" / "nlp" / "gpt"


def run_script(script: str, overrides: list[str], timeout: float = 900, expect_ok: bool = True,
               threads: int = 2, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *overrides], capture_output=True, text=True,
                          timeout=timeout, env=child_env(ALIGNER_NUM_THREADS=str(threads),
                                                         OMP_NUM_THREADS=str(threads), **(env_extra or {})),
                          cwd=str(REPO))
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(log_dir: Path) -> list[dict[str, float]]:
    """The run's metrics.jsonl (whole history across resumes)."""
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_tensors(weights_dir: Path) -> dict:
    """Every tensor of a checkpoint's weights/ (megatron's torch_dist format is PyTorch DCP),
    read without a process group: model weights and, when saved, optimizer moments."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(weights_dir), f"{tmp}/all.pt")
        flat = torch.load(f"{tmp}/all.pt", weights_only=False)
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif isinstance(value, torch.Tensor):
            out[prefix.rstrip(".")] = value

    walk("", flat)
    return out


def series(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), r[key]) for r in rows if key in r]


@pytest.fixture(scope="session")
def movie_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "movie_reviews"
    subprocess.run([sys.executable, "-m", "aligner.data.prep.movie_reviews", "--output-dir", str(out)],
                   check=True, env=child_env(), cwd=str(REPO), capture_output=True, timeout=600)
    return out


def data_overrides(data: Path, kind: str) -> list[str]:
    files = {"sft": "sft", "comparisons": "comparisons", "prompts": "prompts"}[kind]
    return [f"model.tokenizer.model={data / 'tokenizer'}",
            f"model.data.train_ds.file_path={data / (files + '_train.jsonl')}",
            f"model.data.validation_ds.file_path={data / (files + '_val.jsonl')}"]


def grpo_overrides(data: Path, log_dir: Path, *extra: str, seq_length: int = 16) -> list[str]:
    """train_gpt_grpo.py on a prepared task's tokenizer and prompt files, logging to log_dir."""
    return [*data_overrides(data, "prompts"), f"exp_manager.explicit_log_dir={log_dir}",
            "exp_manager.create_tensorboard_logger=false", f"model.encoder_seq_length={seq_length}", *extra]


@pytest.fixture(scope="session")
def sft_run(movie_data, tmp_path_factory) -> Path:
    """The default SFT recipe (conf/gpt_sft.yaml, as the pipeline runs it); later stages start from it."""
    log_dir = tmp_path_factory.mktemp("runs") / "sft"
    run_script("train_gpt_sft.py", [*data_overrides(movie_data, "sft"), f"exp_manager.explicit_log_dir={log_dir}",
                                     "trainer.sft.max_steps=600", "trainer.sft.val_check_interval=200",
                                     "trainer.sft.save_interval=0", "exp_manager.create_tensorboard_logger=false"])
    return log_dir


@pytest.fixture(scope="session")
def rm_run(movie_data, sft_run, tmp_path_factory) -> Path:
    """The default reward-model recipe: what the PPO tests score with (and the critic starts from)."""
    log_dir = tmp_path_factory.mktemp("runs") / "rm"
    run_script("train_reward_model.py", [
        *data_overrides(movie_data, "comparisons"), f"pretrained_checkpoint.restore_from_path={sft_run}",
        f"exp_manager.explicit_log_dir={log_dir}", "trainer.rm.max_steps=300", "trainer.rm.val_check_interval=100",
        "trainer.rm.limit_val_batches=null", "exp_manager.create_tensorboard_logger=false",
    ])
    return log_dir


class CriticProcess:
    """serve_ppo_critic.py (or another server script, e.g. serve_reward_model.py) as a real
    subprocess on a fixed port (restartable)."""

    def __init__(self, overrides: list[str], port: int, log_path: Path, script: str = "serve_ppo_critic.py",
                 port_key: str = "trainer.ppo.port", nproc: int = 1):
        self.overrides, self.port, self.log_path = overrides, port, log_path
        self.script, self.port_key, self.nproc = script, port_key, nproc
        self.proc = None

    def start(self, timeout: float = 300, fault: str | None = None) -> "CriticProcess":
        """fault: an ALIGNER_FAULT spec (aligner/faults.py): the server kills itself there."""
        import time

        from aligner.serving.client import CriticClient, CriticUnavailableError

        log = open(self.log_path, "a")
        env = child_env(ALIGNER_NUM_THREADS="1", OMP_NUM_THREADS="1", **({"ALIGNER_FAULT": fault} if fault else {}))
        args = [*self.overrides, f"{self.port_key}={self.port}"]
        self.proc = subprocess.Popen(python_command(SCRIPTS / self.script, args, self.nproc), stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                     start_new_session=self.nproc > 1)  # so kill() reaches every rank
        deadline = time.monotonic() + timeout
        with CriticClient("127.0.0.1", self.port, total_timeout_s=2) as client:
            while True:
                if self.proc.poll() is not None:
                    if fault:  # it may reach its fault point before we see it ready: the caller checks
                        return self
                    raise AssertionError(f"{self.script} exited with {self.proc.returncode} before it was ready:\n"
                                         f"{self.log_path.read_text()[-4000:]}")
                try:
                    client.wait_until_ready(2)
                    return self
                except CriticUnavailableError:
                    if time.monotonic() > deadline:
                        kill_tree(self.proc)
                        raise AssertionError(f"{self.script} did not become ready:\n"
                                             f"{self.log_path.read_text()[-4000:]}") from None

    def metrics(self) -> dict:
        from aligner.serving.client import CriticClient

        with CriticClient("127.0.0.1", self.port, total_timeout_s=30) as client:
            return client.metrics()

    def kill(self) -> None:
        kill_tree(self.proc)

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
        return self.proc.wait()
