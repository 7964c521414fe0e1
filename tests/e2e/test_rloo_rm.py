"""RLOO scored by the trained reward model served alone (serve_reward_model.py), on the
movie-review task: the policy's responses become more positive as judged by VADER, a lexicon
never used in training. Starts from the session's SFT and RM (shared with the PPO tests)."""
import json

import pytest

from aligner.distributed.launch_env import free_port
from aligner.evaluation.lexicon_judge import judge_samples
from tests.e2e.conftest import CriticProcess, grpo_overrides, read_metrics, run_script, series

STEPS = 100  # at 60 steps VADER rose +0.038 to +0.085 depending on the random draws: too close to the +0.05 bar
pytestmark = pytest.mark.timeout(3600)  # alone, it builds the session's SFT and RM fixtures first


def test_rloo_with_the_reward_model_server_raises_vader(movie_data, sft_run, rm_run, tmp_path):
    port = free_port()
    server = CriticProcess([f"pretrained_checkpoint.restore_from_path={rm_run}",
                            f"exp_manager.explicit_log_dir={tmp_path / 'rm_server'}"], port, tmp_path / "rm_server.log",
                           script="serve_reward_model.py", port_key="trainer.rm_server.port").start()
    run = tmp_path / "rloo"
    try:
        run_script("train_gpt_grpo.py", grpo_overrides(
            movie_data, run, f"pretrained_checkpoint.restore_from_path={sft_run}", "algorithm.adv_estimator=rloo",
            "reward.functions=[]", "reward.remote_rm.enable=true", f"reward.remote_rm.port={port}",
            "algorithm.use_kl_in_reward=true", "algorithm.kl_ctrl.kl_coef=0.1",
            f"trainer.grpo.max_steps={STEPS}", f"trainer.grpo.val_check_interval={STEPS}",
            "trainer.grpo.save_interval=0", "trainer.grpo.val_prompts=256", "trainer.grpo.val_greedy=false",
            "model.grpo.num_prompts_per_step=16", "model.grpo.num_generations=4", "model.global_batch_size=32",
            "model.micro_batch_size=8", "model.grpo.rollout_micro_batch_size=32", "model.grpo.forward_micro_batch_size=16",
            "model.grpo.length_params.max_length=32", "model.grpo.length_params.min_length=16",
            "model.optim.lr=1e-4", "model.optim.sched.min_lr=1e-4", seq_length=64), timeout=1800)
    finally:
        assert server.stop() == 0  # clean shutdown
    rows = read_metrics(run)
    reward = [v for _, v in series(rows, "rollout/reward_mean")]
    assert len(reward) == STEPS
    samples = sorted((run / "samples").glob("val_step_*.jsonl"))
    before, after = judge_samples(samples[0]), judge_samples(samples[-1])
    print(json.dumps({"reward_first5": sum(reward[:5]) / 5, "reward_last5": sum(reward[-5:]) / 5,
                      "before": before, "after": after}, indent=1))
    assert before["samples"] == after["samples"] == 256
    assert after["reward_mean"] > before["reward_mean"] + 0.2, (before, after)  # the RM's own score
    assert after["vader_response_mean"] > before["vader_response_mean"] + 0.05, (before, after)
    assert after["positive_response_fraction"] > before["positive_response_fraction"], (before, after)
