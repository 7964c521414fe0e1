"""SFT learns on the embedded data, resumes exactly, and rejects bad input clearly."""
import json

from tests.e2e.conftest import data_overrides, read_metrics, run_script, series


def test_sft_lowers_validation_loss(sft_run):
    val = series(read_metrics(sft_run), "val/loss")
    first, last = val[0][1], val[-1][1]
    assert val[0][0] == 0 and len(val) >= 3
    # from ~ln(4096)=8.3 for a random model; a clear drop, not noise
    assert last < first - 1.5, val
    assert all(b < a for (_, a), (_, b) in zip(val, val[1:])), val
    assert (sft_run / "curves.png").stat().st_size > 10_000
    assert (sft_run / "checkpoints").is_dir()


TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=null", "model.micro_batch_size=4", "model.global_batch_size=8",
        "model.encoder_seq_length=64", "exp_manager.create_tensorboard_logger=false",
        "model.optim.sched.max_steps=8", "trainer.sft.val_check_interval=0"]


def test_interrupted_then_resumed_run_matches_uninterrupted(movie_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*data_overrides(movie_data, "sft"), *TINY, "model.optim.sched.warmup_steps=2"]
    run_script("train_gpt_sft.py", [*common, f"exp_manager.explicit_log_dir={straight}", "trainer.sft.max_steps=8"])
    # the same run, stopped after step 4 (its last checkpoint), then started again to step 8
    run_script("train_gpt_sft.py", [*common, f"exp_manager.explicit_log_dir={resumed}", "trainer.sft.max_steps=4"])
    state = json.loads(next((resumed / "checkpoints").glob("step_0000004/trainer_state.json")).read_text())
    assert state["step"] == 4 and state["sampler"]["consumed_samples"] == 32
    run_script("train_gpt_sft.py", [*common, f"exp_manager.explicit_log_dir={resumed}", "trainer.sft.max_steps=8"])
    a = dict(series(read_metrics(straight), "train/loss"))
    b = dict(series(read_metrics(resumed), "train/loss"))
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert a[8] != a[5]  # training actually moved
    lr_a = dict(series(read_metrics(straight), "train/lr"))
    lr_b = dict(series(read_metrics(resumed), "train/lr"))
    assert all(abs(lr_a[s] - lr_b[s]) < 1e-12 for s in range(1, 9))


def _fails_with(movie_data, tmp_path, overrides, *needles):
    proc = run_script("train_gpt_sft.py", [*data_overrides(movie_data, "sft"), *TINY,
                                           f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
                                           "trainer.sft.max_steps=1", *overrides], expect_ok=False, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    for needle in needles:
        assert needle in output, (needle, output[-3000:])
    assert "Traceback" not in output or "HYDRA_FULL_ERROR" in output
    return output


def test_malformed_jsonl_line_names_file_and_line(movie_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n')
    _fails_with(movie_data, tmp_path, [f"model.data.train_ds.file_path={bad}"], f"{bad}:2")


def test_missing_key_names_file_line_and_keys(movie_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"question": "c"}\n')
    _fails_with(movie_data, tmp_path, [f"model.data.train_ds.file_path={bad}"], f"{bad}:2", "answer")


def test_missing_file_is_named(movie_data, tmp_path):
    _fails_with(movie_data, tmp_path, [f"model.data.train_ds.file_path={tmp_path / 'nope.jsonl'}"],
                str(tmp_path / "nope.jsonl"))


def test_unknown_config_key(movie_data, tmp_path):
    _fails_with(movie_data, tmp_path, ["model.optim.lrr=0.1"], "lrr")
    _fails_with(movie_data, tmp_path, ["+model.optim.lrr=0.1"], "model.optim.lrr: unknown key")


def test_wrong_type(movie_data, tmp_path):
    _fails_with(movie_data, tmp_path, ["model.optim.lr=fast"], "model.optim.lr", "expected float")
    _fails_with(movie_data, tmp_path, ["model.micro_batch_size=2.5"], "model.micro_batch_size", "expected int")


def test_bad_parallel_layout_names_config_keys(movie_data, tmp_path):
    _fails_with(movie_data, tmp_path, ["model.global_batch_size=6"], "model.global_batch_size")
