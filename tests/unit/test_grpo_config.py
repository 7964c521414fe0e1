"""conf/gpt_grpo.yaml composes, shows every key of the critic-free family, and bad settings are
refused at start-up naming the key."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from aligner.training.entry import CONF_DIR, prepare_config
from tests.launch import REPO, child_env

KEYS = ["adv_estimator: grpo", "norm_adv_by_std_in_grpo:", "num_generations:", "use_kl_in_reward:", "kl_penalty:",
        "use_kl_loss:", "kl_loss_coef:", "kl_loss_type:", "loss_agg_mode:", "clip_ratio_low:", "clip_ratio_high:",
        "filter_groups:", "max_num_gen_batches:", "overlong_buffer:", "penalty_factor:",
        "mask_truncated_completions:", "functions:", "timeout_s:", "fallback:", "remote_rm:"]


def test_cfg_job_composes_and_shows_every_key():
    out = subprocess.run([sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_grpo.py"), "--cfg", "job",
                          "algorithm.adv_estimator=rloo", "algorithm.loss_agg_mode=seq-mean-token-sum-norm"],
                         capture_output=True, text=True, env=child_env(), cwd=str(REPO), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.replace("adv_estimator: rloo", "adv_estimator: grpo")
    missing = [k for k in KEYS if k not in text]
    assert not missing, missing
    assert "seq-mean-token-sum-norm" in out.stdout


def _settings(overrides):
    from aligner.trainers import grpo

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("gpt_grpo", overrides=overrides)
    prepare_config(cfg, CONF_DIR / "gpt_grpo.yaml")
    return grpo.engine_settings(cfg)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_one_generation_with_a_group_estimator_is_refused_naming_the_key(estimator):
    with pytest.raises(ValueError, match=r"model\.grpo\.num_generations=1"):
        _settings([f"algorithm.adv_estimator={estimator}", "model.grpo.num_generations=1"])


@pytest.mark.parametrize("override,key", [("algorithm.adv_estimator=ppo", "algorithm.adv_estimator"),
                                          ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode"),
                                          ("algorithm.kl_loss_type=k9", "algorithm.kl_loss_type")])
def test_unknown_choices_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _settings([override])


def test_reference_is_parked_only_when_a_kl_term_uses_it():
    assert not _settings([]).needs_reference  # KL off by default: no parked copy of the weights
    assert _settings(["algorithm.use_kl_loss=true"]).needs_reference
    assert _settings(["algorithm.use_kl_in_reward=true"]).needs_reference
    assert not _settings(["algorithm.use_kl_loss=true", "algorithm.kl_loss_coef=0"]).needs_reference


def test_reinforce_and_remax_accept_one_generation():
    for estimator in ("reinforce_plus_plus", "remax"):
        settings = _settings([f"algorithm.adv_estimator={estimator}", "model.grpo.num_generations=1",
                              "model.grpo.num_prompts_per_step=64"])
        assert settings.samples_per_prompt == 1
