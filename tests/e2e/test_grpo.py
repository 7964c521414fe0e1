"""The critic-free family end to end on the built-in arithmetic task (verifiable reward)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.conftest import checkpoint_tensors, grpo_overrides, read_metrics, run_script
from tests.launch import REPO, child_env


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "arithmetic"
    subprocess.run([sys.executable, "-m", "aligner.data.prep.arithmetic", "--output-dir", str(out)],
                   check=True, env=child_env(), cwd=str(REPO), capture_output=True, timeout=600)
    return out


PROBE = '''
import json, os

def length_reward(prompts, responses, answer, **_):
    """Deterministic, varied rewards; records what it was called with and what it returned."""
    values = [float(len(r) % 3) for r in responses]
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps({"n": len(responses), "answers": len(answer), "values": values}) + "\\n")
    return values

def raises(prompts, responses, **_):
    raise ValueError("boom from the probe")

def nan(prompts, responses, **_):
    return [float("nan")] * len(responses)

def hangs(prompts, responses, **_):
    while True:  # a pure-Python busy loop: only killing the worker stops it
        pass
'''


def test_reward_functions_reach_the_advantages_and_failing_ones_leave_the_run_alive(arithmetic_data, tmp_path):
    """Functions named by file path: a good one's values are the step's scores (so they drive the
    advantages); one that raises, one that returns NaN and one that hangs get the fallback, are
    counted every step and logged once, and the run finishes."""
    probe = tmp_path / "probe_rewards.py"
    probe.write_text(textwrap.dedent(PROBE))
    log = tmp_path / "probe.jsonl"
    functions = ",".join(f'{{path:"{probe}:{name}",weight:{w}}}'
                         for name, w in (("length_reward", 1.0), ("raises", 1.0), ("nan", 1.0), ("hangs", 1.0)))
    steps, prompts, n = 2, 4, 4
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_grpo.py"),
         *grpo_overrides(arithmetic_data, tmp_path / "run", f"reward.functions=[{functions}]", "reward.timeout_s=3",
                         "reward.fallback=0.0", f"trainer.grpo.max_steps={steps}", "trainer.grpo.val_check_interval=0",
                         "pretrained_checkpoint.restore_from_path=null", f"model.grpo.num_prompts_per_step={prompts}",
                         f"model.grpo.num_generations={n}", "model.global_batch_size=16", "model.micro_batch_size=8",
                         "model.grpo.rollout_micro_batch_size=16", "model.grpo.forward_micro_batch_size=16",
                         "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2")],
        capture_output=True, text=True, timeout=600, cwd=str(REPO),
        env=child_env(PROBE_LOG=str(log), ALIGNER_NUM_THREADS="2", OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == steps and all(c["n"] == c["answers"] == prompts * n for c in calls), calls
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "rollout/score_mean" in r}
    for step, call in zip(sorted(rows), calls):
        row = rows[step]
        assert row["rollout/score_mean"] == pytest.approx(sum(call["values"]) / len(call["values"]), abs=1e-6)
        assert row["rollout/zero_advantage_fraction"] < 1.0  # the values became advantages
        for name, kind in (("raises", "error"), ("nan", "nonfinite"), ("hangs", "timeout")):
            assert row[f"rollout/reward_fn/{name}/{kind}"] == prompts * n, (name, row)
            assert row[f"rollout/reward_fn/{name}/failed"] == prompts * n
        assert row["rollout/reward_fn/length_reward/failed"] == 0
    assert proc.stderr.count("boom from the probe") + proc.stdout.count("boom from the probe") >= 1
    assert (proc.stderr + proc.stdout).count("ValueError: boom from the probe") == 1  # the traceback, once


TINY = ["pretrained_checkpoint.restore_from_path=null", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_layers=2", "trainer.grpo.val_check_interval=2", "trainer.grpo.val_prompts=8",
        "trainer.grpo.max_steps=2", "model.grpo.num_prompts_per_step=4", "model.grpo.num_generations=4",
        "model.global_batch_size=8", "model.micro_batch_size=4", "model.grpo.rollout_micro_batch_size=16",
        "model.grpo.forward_micro_batch_size=16", "trainer.grpo.ppo_epochs=2"]


@pytest.mark.parametrize("estimator,options", [
    ("grpo", ["algorithm.filter_groups.enable=true", "algorithm.filter_groups.max_num_gen_batches=3",
              "algorithm.overlong_buffer.enable=true", "algorithm.use_kl_loss=true", "algorithm.clip_ratio_high=0.28"]),
    ("rloo", ["algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=k3",
              "algorithm.loss_agg_mode=seq-mean-token-mean"]),
    ("remax", ["algorithm.clip_ratio_c=3.0"]),
    ("reinforce_plus_plus", ["algorithm.use_kl_in_reward=true", "algorithm.gamma=0.9"]),
    ("reinforce_plus_plus_baseline", ["algorithm.mask_truncated_completions=true",
                                      "algorithm.loss_agg_mode=seq-mean-token-sum-norm", "algorithm.norm_adv_by_std_in_grpo=false"]),
], ids=["grpo-dapo", "rloo-kl-reward", "remax", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_estimator_runs_end_to_end(arithmetic_data, tmp_path, estimator, options):
    """Each estimator with its options through the real entry script: two steps (two epochs of
    mini-batches each), validation, a checkpoint; finite losses and a moving policy."""
    probe = tmp_path / "probe_rewards.py"
    probe.write_text(textwrap.dedent(PROBE))
    run_script("train_gpt_grpo.py", grpo_overrides(
        arithmetic_data, tmp_path / "run", f"algorithm.adv_estimator={estimator}", *TINY, *options,
        f'reward.functions=[{{path:"{probe}:length_reward",weight:1.0}}]'), timeout=600,
        env_extra={"PROBE_LOG": str(tmp_path / "probe.jsonl")})
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "train/updates" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert all(v == v and abs(v) != float("inf") for k, v in r.items() if k.startswith(("train/", "rollout/"))), r
    if "mask_truncated_completions=true" in " ".join(options):
        # the random policy rarely ends a response: with truncated ones masked there may be nothing to learn,
        # and then no update is made (rather than a division by zero)
        assert all(r["train/updates"] == 0 for r in steps if r["rollout/is_end_fraction"] == 0)
    else:
        assert all(r["train/updates"] == 4 for r in steps)  # 2 epochs x 2 mini-batches
        assert max(r["train/grad_norm"] for r in steps) > 0  # the policy was pushed somewhere
    assert [r["step"] for r in rows if "val/reward_mean" in r] == [0, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "COMPLETE").is_file()
    if "filter_groups.enable=true" in " ".join(options):
        assert all(1 <= r["rollout/generation_rounds"] <= 3 and r["rollout/kept_groups"] <= 4 for r in steps)


def test_reused_sampler_logprobs_train_like_recomputed_ones(arithmetic_data, tmp_path):
    """trainer.grpo.recompute_logprobs=false (the default) takes PPO's old log-probs from the
    sampler after checking the first rows; true recomputes every row. Same samples, so step 1's
    losses and the weights after it agree to float32 noise; the guard's gap is logged each step."""
    runs = {}
    for recompute in ("false", "true"):
        run_dir = tmp_path / f"recompute_{recompute}"
        run_script("train_gpt_grpo.py", grpo_overrides(
            arithmetic_data, run_dir, *TINY, "trainer.grpo.max_steps=1", "trainer.grpo.val_check_interval=0",
            "trainer.grpo.save_interval=1", f"trainer.grpo.recompute_logprobs={recompute}",
            "model.optim.eps=1.0e-6"), timeout=600)  # eps: Adam would turn ~0 gradients' noise into whole steps
        runs[recompute] = ([r for r in read_metrics(run_dir) if "train/updates" in r][0],
                           checkpoint_tensors(run_dir / "checkpoints" / "step_0000001" / "weights"))
    (reused, reused_weights), (recomputed, recomputed_weights) = runs["false"], runs["true"]
    assert reused["rollout/logprobs_recomputed"] == 0.0 and recomputed["rollout/logprobs_recomputed"] == 1.0
    assert reused["rollout/reward_mean"] == recomputed["rollout/reward_mean"]  # the same samples
    assert 0 < reused["rollout/generator_logprob_abs_gap"] < 1e-4, reused
    for key in ("train/policy_loss", "train/clip_fraction", "train/approx_kl", "train/entropy"):
        assert reused[key] == pytest.approx(recomputed[key], abs=1e-5), key
    assert reused["train/ratio_mean"] != recomputed["train/ratio_mean"] or reused["train/policy_loss"] != \
        recomputed["train/policy_loss"]  # the two paths really differ (by float32 noise), not one path twice
    weights = [k for k in reused_weights if not k.startswith("optimizer.") and reused_weights[k].is_floating_point()]
    difference = max((reused_weights[k] - recomputed_weights[k]).abs().max().item() for k in weights)
    print(f"max |weight difference| after step 1: {difference:.3g}")
    assert weights and difference < 1e-6  # lr 1e-5, 4 optimizer steps: a real difference would be ~1e-5


def test_trt_llm_backend_is_driven_through_its_real_call_sequence(arithmetic_data, tmp_path):
    """trainer.grpo.trt_llm.enable=true against tests/stand_ins/tensorrt_llm (records its calls):
    the rollout engine exports the policy, builds the engine from it, unloads it before each
    policy update (unload_engine_train), rebuilds it from the *updated* weights for the next step,
    and the engine's tokens are the rollouts the reward scores (the stand-in answers every other
    problem right: reward exactly 0.5)."""
    import importlib.util

    stand_ins = REPO / "tests" / "stand_ins"
    record = tmp_path / "calls.jsonl"
    run_dir = tmp_path / "run"
    steps = ["trainer.grpo.max_steps=2", "trainer.grpo.val_check_interval=0", "trainer.grpo.save_interval=1"]
    run_script("train_gpt_grpo.py", grpo_overrides(
        arithmetic_data, run_dir, *TINY, *steps, "trainer.grpo.trt_llm.enable=true",
        "trainer.grpo.trt_llm.unload_engine_train=true", f"trainer.grpo.trt_llm.engine_dir={tmp_path / 'engine'}"),
        env_extra={"PYTHONPATH": f"{stand_ins}:{REPO}", "ALIGNER_TRTLLM_RECORD": str(record)})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["event"] for c in calls] == ["build", "generate", "shutdown"] * 2, calls
    rows = [r for r in read_metrics(run_dir) if "rollout/reward_mean" in r]
    assert [r["rollout/reward_mean"] for r in rows] == [0.5, 0.5], rows
    # the engine's log-probs (the stand-in says -0.25 for every token) fail the reuse check:
    # every step recomputes its old log-probs with the trainer's own forward pass
    assert all(r["rollout/logprobs_recomputed"] == 1.0 and r["rollout/generator_logprob_abs_gap"] > 1e-2
               for r in rows), rows
    # the second engine was built from exactly the weights after step 1's update
    spec = importlib.util.spec_from_file_location("stand_in_trtllm", stand_ins / "tensorrt_llm" / "__init__.py")
    stand_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_in)
    exported = tmp_path / "step1_hf"
    subprocess.run([sys.executable, str(REPO / "examples" / "nlp" / "gpt" / "export_hf.py"),
                    str(run_dir / "checkpoints" / "step_0000001"), str(exported)],
                   check=True, env=child_env(), cwd=str(REPO), capture_output=True, timeout=300)
    builds = [c for c in calls if c["event"] == "build"]
    assert builds[1]["digest"] == stand_in.weights_digest(exported)
    assert builds[0]["digest"] != builds[1]["digest"]  # the update moved the weights the engine got
    assert (tmp_path / "engine" / "hf" / "config.json").is_file()  # trt_llm.engine_dir is where it builds


@pytest.mark.parametrize("key,value,message", [
    ("reshard", "true", "reshard=true is not implemented"),
    ("model_type", "qwen2", "model_type='qwen2' but the policy exports as model_type 'llama'"),
])
def test_trt_llm_keys_are_read(arithmetic_data, tmp_path, key, value, message):
    stand_ins = REPO / "tests" / "stand_ins"
    proc = run_script("train_gpt_grpo.py", grpo_overrides(
        arithmetic_data, tmp_path / "run", *TINY, "trainer.grpo.trt_llm.enable=true",
        f"trainer.grpo.trt_llm.{key}={value}"), expect_ok=False,
        env_extra={"PYTHONPATH": f"{stand_ins}:{REPO}", "ALIGNER_TRTLLM_RECORD": str(tmp_path / "calls.jsonl")})
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
