"""Resume is exact: SFT (with dropout), the reward model and DPO, killed with SIGKILL at a named
fault point (aligner/faults.py) and started again with the same command, log the same per-step
losses and learning rates as an uninterrupted run and end with the same weights and Adam moments
(1e-6 in fp32; on one CPU thread they are bitwise equal).

Dropout 0.1 in the SFT model makes training draw from the RNG streams, so the resumed run matches
only if the checkpoint restored them (the SFT case also resumes a copy whose RNG files were
deleted, and requires it to differ). RM and DPO start from that SFT checkpoint and inherit its
model config, dropout included. Each trainer's uninterrupted and killed runs go side by side, one
thread each (the same thread count for every run, so reductions add up in the same order).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import SCRIPTS, checkpoint_tensors, data_overrides, read_metrics
from tests.launch import REPO, child_env

pytestmark = pytest.mark.slow  # nine training processes, two at a time

STEPS, SAVE_EVERY, KILL_AT = 8, 3, 5  # killed after step 5: the last checkpoint is step 3
TOL = 1e-6
TINY = ["model.micro_batch_size=4", "model.global_batch_size=8", "model.encoder_seq_length=64",
        "exp_manager.create_tensorboard_logger=false", "model.optim.sched.warmup_steps=2"]
TINY_NET = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2",
            "model.num_attention_heads=2", "model.num_query_groups=null"]
DROPOUT = 0.1
# Timing metrics differ between any two runs; everything else a step logs must not.
UNTIMED = ("train/step_time_s", "train/tokens_per_s")


def _loop(algo: str) -> list[str]:
    return [f"trainer.{algo}.max_steps={STEPS}", f"trainer.{algo}.save_interval={SAVE_EVERY}",
            f"trainer.{algo}.val_check_interval=0"]


def _launch(script: str, log_dir: Path, overrides: list[str], fault: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """One training process on one thread; `fault` is an ALIGNER_FAULT spec."""
    env = child_env(ALIGNER_NUM_THREADS="1", OMP_NUM_THREADS="1", **({"ALIGNER_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, str(SCRIPTS / script), *overrides, f"exp_manager.explicit_log_dir={log_dir}"],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


def _expect(proc: subprocess.CompletedProcess, killed: bool) -> None:
    want = -signal.SIGKILL if killed else 0
    assert proc.returncode == want, (f"exit {proc.returncode}, expected {want}\n{proc.stdout[-3000:]}\n"
                                     f"{proc.stderr[-5000:]}")


def _side_by_side(*jobs) -> list[subprocess.CompletedProcess]:
    """Run (script, log_dir, overrides, fault) jobs concurrently."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(_launch, *job) for job in jobs]]


def _complete_steps(log_dir: Path) -> list[int]:
    from aligner.training import checkpoint

    return [step for step, _ in checkpoint.list_complete(log_dir / "checkpoints")]


def _train_rows(log_dir: Path) -> dict[int, dict[str, float]]:
    """step -> that step's train/* metrics; each step logged exactly once (the journal dropped the
    steps the killed run logged after its last checkpoint)."""
    rows = [r for r in read_metrics(log_dir) if any(k.startswith("train/") for k in r)]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, STEPS + 1)), steps
    return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/") and k not in UNTIMED}
            for r in rows}


def _max_metric_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest |a - b| per metric over all steps."""
    out: dict[str, float] = {}
    for step in a:
        assert a[step].keys() == b[step].keys(), (step, sorted(a[step]), sorted(b[step]))
        for key in a[step]:
            out[key] = max(out.get(key, 0.0), abs(a[step][key] - b[step][key]))
    return out


def _max_weight_diff(a_dir: Path, b_dir: Path) -> float:
    name = f"checkpoints/step_{STEPS:07d}/weights"
    a, b = checkpoint_tensors(a_dir / name), checkpoint_tensors(b_dir / name)
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a), sorted(a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _assert_same_run(straight: Path, resumed: Path, resumed_log: str, resumed_from: int) -> dict[str, float]:
    assert f"step_{resumed_from:07d} at step {resumed_from}" in resumed_log, resumed_log[-3000:]
    a, b = _train_rows(straight), _train_rows(resumed)
    diffs = _max_metric_diff(a, b)
    assert "train/loss" in diffs and "train/lr" in diffs, diffs
    assert all(d <= TOL for d in diffs.values()), diffs
    assert a[STEPS]["train/loss"] != a[resumed_from + 1]["train/loss"]  # training moved after the resume
    weights = _max_weight_diff(straight, resumed)
    assert weights <= TOL, weights
    assert not list((resumed / "checkpoints").glob("*.partial")), list((resumed / "checkpoints").iterdir())
    print(f"{resumed.name}: max |diff| per metric {diffs}, final weights and Adam moments {weights}")
    return diffs


def _saved_dropout(log_dir: Path) -> float:
    import json

    state = json.loads((log_dir / "checkpoints" / f"step_{STEPS:07d}" / "trainer_state.json").read_text())
    return state["model_config"]["hidden_dropout"]


@pytest.fixture(scope="module")
def sft_pair(movie_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """SFT with dropout, uninterrupted and killed after step 5 (side by side)."""
    root = tmp_path_factory.mktemp("resume_sft")
    overrides = [*data_overrides(movie_data, "sft"), *TINY, *TINY_NET, *_loop("sft"),
                 f"model.hidden_dropout={DROPOUT}", f"model.attention_dropout={DROPOUT}"]
    straight, killed = root / "straight", root / "resumed"
    done, died = _side_by_side(("train_gpt_sft.py", straight, overrides, None),
                               ("train_gpt_sft.py", killed, overrides, f"train.after_step@{KILL_AT}"))
    _expect(done, killed=False)
    _expect(died, killed=True)
    assert _complete_steps(killed) == [SAVE_EVERY]
    return straight, killed, overrides


def test_sft_with_dropout_resumes_exactly(sft_pair):
    straight, killed, overrides = sft_pair
    assert _saved_dropout(straight) == DROPOUT
    # The same kill, resumed without its RNG files: dropout must make it differ (else the test is vacuous).
    no_rng = killed.parent / "resumed_without_rng"
    shutil.copytree(killed, no_rng)
    for rng_file in no_rng.glob("checkpoints/step_*/rng/*.pt"):
        rng_file.unlink()
    resumed, control = _side_by_side(("train_gpt_sft.py", killed, overrides, None),
                                     ("train_gpt_sft.py", no_rng, overrides, None))
    _expect(resumed, killed=False)
    _expect(control, killed=False)
    _assert_same_run(straight, killed, resumed.stdout, resumed_from=SAVE_EVERY)
    a, c = _train_rows(straight), _train_rows(no_rng)
    control_diff = max(abs(a[s]["train/loss"] - c[s]["train/loss"]) for s in a)
    print(f"without the RNG restore: max |loss diff| {control_diff}")
    assert control_diff > 1e-4, control_diff


def test_reward_model_resumes_exactly_after_a_kill_inside_a_checkpoint_save(movie_data, sft_pair, tmp_path):
    """Killed while writing the step-6 checkpoint: the half-written one is ignored, step 3 is used."""
    overrides = [*data_overrides(movie_data, "comparisons"), *TINY, *_loop("rm"),
                 f"pretrained_checkpoint.restore_from_path={sft_pair[0]}",
                 "model.reward_standardization.enable=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done, died = _side_by_side(("train_reward_model.py", straight, overrides, None),
                               ("train_reward_model.py", resumed, overrides, "checkpoint.before_commit@2"))
    _expect(done, killed=False)
    _expect(died, killed=True)
    half = resumed / "checkpoints" / f"step_{2 * SAVE_EVERY:07d}.partial"
    assert (half / "weights").is_dir() and _complete_steps(resumed) == [SAVE_EVERY]
    again = _launch("train_reward_model.py", resumed, overrides)
    _expect(again, killed=False)
    assert _saved_dropout(resumed) == DROPOUT  # inherited from the SFT checkpoint
    _assert_same_run(straight, resumed, again.stdout, resumed_from=SAVE_EVERY)


def test_dpo_resumes_exactly(movie_data, sft_pair, tmp_path):
    overrides = [*data_overrides(movie_data, "comparisons"), *TINY, *_loop("dpo"),
                 f"pretrained_checkpoint.restore_from_path={sft_pair[0]}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done, died = _side_by_side(("train_gpt_dpo.py", straight, overrides, None),
                               ("train_gpt_dpo.py", resumed, overrides, f"train.after_step@{KILL_AT}"))
    _expect(done, killed=False)
    _expect(died, killed=True)
    assert _complete_steps(resumed) == [SAVE_EVERY]
    again = _launch("train_gpt_dpo.py", resumed, overrides)
    _expect(again, killed=False)
    assert _saved_dropout(resumed) == DROPOUT
    _assert_same_run(straight, resumed, again.stdout, resumed_from=SAVE_EVERY)
