"""The critic-free family learns from a verifiable reward: held-out arithmetic accuracy rises.

The warm start is a tiny from-scratch model (4 layers, 256 wide) fine-tuned on 1-2-digit
addition by a *flawed teacher*: 60% of its SFT answers carry a spurious trailing '0' (85 -> 850;
``--sft-trailing-zero-rate 0.6``). The model learns to add, but its greedy answer is usually
the flawed one, so its held-out exact-match accuracy starts near 0 while its samples are right
often enough to learn from. Nothing but the exact-match reward tells RL that the digits alone
pay; the held-out problems are disjoint from the SFT and RL prompts (one shuffle, cut into
parts). The SFT is shared by the three learners.

Bars (greedy exact match on 300 held-out problems, before -> after 12 steps):
GRPO must gain >= 15 points; REINFORCE++ and ReMax, the lower bar of >= 10 points.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import data_overrides, grpo_overrides, read_metrics, run_script, series
from tests.launch import REPO, child_env

HELD_OUT = 300
STEPS = 12
WIDE = ["model.hidden_size=256", "model.ffn_hidden_size=688", "model.encoder_seq_length=16"]


@pytest.fixture(scope="module")
def addition_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "addition"
    subprocess.run([sys.executable, "-m", "aligner.data.prep.arithmetic", "--output-dir", str(out),
                    "--operators", "+", "--sft-size", "8000", "--train-size", "1500", "--val-size", str(HELD_OUT),
                    "--sft-trailing-zero-rate", "0.6"],
                   check=True, env=child_env(), cwd=str(REPO), capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def flawed_sft(addition_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_addition")
    run_script("train_gpt_sft.py", [
        *data_overrides(addition_data, "sft"), f"exp_manager.explicit_log_dir={out}",
        "exp_manager.create_tensorboard_logger=false",
        "trainer.sft.max_steps=800", "trainer.sft.val_check_interval=800", "trainer.sft.save_interval=800",
        "model.global_batch_size=64", "model.micro_batch_size=64", "model.optim.lr=2e-3", *WIDE], timeout=900)
    return out


@pytest.mark.parametrize("estimator,bar", [("grpo", 0.15), ("reinforce_plus_plus", 0.10), ("remax", 0.10)])
def test_held_out_accuracy_rises(addition_data, flawed_sft, tmp_path, estimator, bar):
    run = tmp_path / "run"
    run_script("train_gpt_grpo.py", grpo_overrides(
        addition_data, run, f"pretrained_checkpoint.restore_from_path={flawed_sft}", f"algorithm.adv_estimator={estimator}",
        f"trainer.grpo.max_steps={STEPS}", f"trainer.grpo.val_check_interval={STEPS}",
        f"trainer.grpo.val_prompts={HELD_OUT}", "trainer.grpo.save_interval=0",
        "model.optim.lr=1e-4", "model.optim.sched.min_lr=1e-4", "model.grpo.num_prompts_per_step=16",
        "model.grpo.num_generations=8", "model.global_batch_size=64", "model.micro_batch_size=16"), timeout=600)
    rows = read_metrics(run)
    accuracy = dict(series(rows, "val/reward_mean"))
    assert sorted(accuracy) == [0, STEPS], accuracy
    before, after = accuracy[0], accuracy[STEPS]
    print(f"{estimator}: held-out greedy exact match {before:.3f} -> {after:.3f} over {STEPS} steps")
    assert after - before >= bar, (estimator, before, after)
    # it is the flaw that was unlearned: greedy answers got shorter (no trailing '0')
    lengths = dict(series(rows, "val/response_length"))
    assert lengths[STEPS] < lengths[0] - 0.5, lengths
    assert (run / "curves.png").is_file()
