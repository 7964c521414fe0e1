"""The reward model and DPO learn on the embedded movie-review preference pairs."""
from tests.e2e.conftest import data_overrides, read_metrics, run_script, series


def test_reward_model_reaches_held_out_accuracy(rm_run):
    """The default RM recipe (the rm_run fixture: 300 steps from the default SFT), judged on every
    held-out comparison (graded pairs: ratings at least 1 apart, whole snippets and continuations)."""
    rows = read_metrics(rm_run)
    accuracy = series(rows, "val/accuracy")
    assert accuracy[0] == (0, 0.5)  # fresh zero head: every pair is a tie
    assert accuracy[-1][0] == 300 and accuracy[-1][1] >= 0.75, accuracy
    loss = series(rows, "val/loss")
    assert loss[-1][1] < loss[0][1] - 0.1, loss
    state = (rm_run / "checkpoints").glob("step_0000300/trainer_state.json")
    import json

    saved = json.loads(next(state).read_text())
    assert saved["scalar_head"] is True and saved["reward_standardization"]["std"] > 0


def test_dpo_raises_preference_accuracy_and_margin(movie_data, sft_run, tmp_path):
    log_dir = tmp_path / "dpo"
    run_script("train_gpt_dpo.py", [
        *data_overrides(movie_data, "comparisons"), f"pretrained_checkpoint.restore_from_path={sft_run}",
        f"exp_manager.explicit_log_dir={log_dir}", "trainer.dpo.max_steps=80", "trainer.dpo.val_check_interval=40",
        "exp_manager.create_tensorboard_logger=false",
    ])
    rows = read_metrics(log_dir)
    accuracy = dict(series(rows, "val/preference_accuracy"))
    margin = dict(series(rows, "val/implicit_reward_margin"))
    kl = dict(series(rows, "val/kl_to_ref"))
    assert accuracy[0] == 0.0 and margin[0] == 0.0 and kl[0] == 0.0  # policy == reference at the start
    # graded pairs (ratings >= 1 apart) are harder than extreme-vs-extreme ones: 80 steps, not 40
    assert accuracy[80] > 0.6 and accuracy[80] >= accuracy[40] - 0.05, accuracy
    assert margin[80] > margin[40] > 0, margin
    assert 0 < kl[80] < 10, kl  # finite and logged


def test_ipo_and_rpo_variants_run(movie_data, sft_run, tmp_path):
    for loss in ("ipo", "rpo_sq"):
        log_dir = tmp_path / loss
        run_script("train_gpt_dpo.py", [
            *data_overrides(movie_data, "comparisons"), f"pretrained_checkpoint.restore_from_path={sft_run}",
            f"exp_manager.explicit_log_dir={log_dir}", "trainer.dpo.max_steps=4", "trainer.dpo.val_check_interval=4",
            f"model.dpo.preference_loss={loss}", "exp_manager.create_tensorboard_logger=false",
            "trainer.dpo.limit_val_batches=2",
        ])
        margin = dict(series(read_metrics(log_dir), "val/implicit_reward_margin"))
        assert margin[4] != 0.0


def test_comparison_format_errors_name_file_and_line(movie_data, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "pos_answers": ["a", "b"], "neg_answers": ["c"]}\n')
    proc = run_script("train_reward_model.py", [
        *data_overrides(movie_data, "comparisons"), f"model.data.train_ds.file_path={bad}",
        "pretrained_checkpoint.restore_from_path=null", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        "trainer.rm.max_steps=1", "model.num_layers=1"], expect_ok=False, timeout=300)
    assert proc.returncode != 0 and f"{bad}:1" in proc.stdout + proc.stderr
