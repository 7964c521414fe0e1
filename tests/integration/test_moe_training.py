"""A mixture-of-experts model trains, and expert parallelism is a layout, not a different model:
SFT of a Mixtral-style model (model.num_experts=4, top-2) on two processes with
model.expert_model_parallel_size=2 (each rank holds two experts) makes the same per-step losses
and the same final weights and Adam moments as one process holding all four. Both start from one
checkpoint written by a one-process run (random init draws experts per expert-parallel rank), so
loading also reshards the experts."""
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.e2e.conftest import SCRIPTS, checkpoint_tensors, data_overrides, movie_data  # noqa: F401 (fixture)
from tests.launch import REPO, check, child_env, torchrun

STEPS = 12
MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.num_layers=2", "model.hidden_size=64",
       "model.ffn_hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
       "model.global_batch_size=8", "model.micro_batch_size=4", "model.optim.sched.warmup_steps=0",
       f"trainer.sft.max_steps={STEPS}", "trainer.sft.val_check_interval=0", "trainer.sft.save_interval=0",
       "exp_manager.create_tensorboard_logger=false"]


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if "train/loss" in r}


def _final(log_dir: Path) -> dict:
    """Weights and Adam moments by parameter. With experts split, megatron chains two optimizers
    (dense and expert parameters) and prefixes their state ``chained_<i>.``: dropped here."""
    tensors = checkpoint_tensors(log_dir / "checkpoints" / f"step_{STEPS:07d}" / "weights")
    return {re.sub(r"^chained_\d+\.", "", name): value for name, value in tensors.items()}


def test_expert_parallel_sft_equals_one_process(movie_data, tmp_path):  # noqa: F811
    script = SCRIPTS / "train_gpt_sft.py"
    start, one, two = tmp_path / "start", tmp_path / "ep1", tmp_path / "ep2"
    common = [*data_overrides(movie_data, "sft"), *MOE]
    check(subprocess.run([sys.executable, str(script), *common, "trainer.sft.max_steps=1",
                          f"exp_manager.explicit_log_dir={start}"],
                         capture_output=True, text=True, timeout=600, env=child_env(), cwd=str(REPO)))
    common.append(f"pretrained_checkpoint.restore_from_path={start / 'checkpoints' / 'step_0000001'}")
    check(subprocess.run([sys.executable, str(script), *common, f"exp_manager.explicit_log_dir={one}"],
                         capture_output=True, text=True, timeout=600, env=child_env(), cwd=str(REPO)))
    out = check(torchrun(script, [*common, f"exp_manager.explicit_log_dir={two}", "trainer.devices=2",
                                  "model.expert_model_parallel_size=2"], nproc=2, timeout=600))
    assert "dp=2 ep=2" in out, out[-2000:]
    got, want = _losses(two), _losses(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    first, last = [want[s] for s in (1, 2, 3)], [want[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, want  # it learns
    a, b = _final(two), _final(one)
    experts = [name for name in b if "local_experts" in name or "experts." in name]
    assert experts, sorted(b)[:10]  # the checkpoint really holds expert weights
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_expert_parallel_needs_a_moe_model_and_a_dividing_size(movie_data, tmp_path):  # noqa: F811
    script = SCRIPTS / "train_gpt_sft.py"
    dense = torchrun(script, [*data_overrides(movie_data, "sft"), *MOE[2:], "model.num_experts=null",
                              f"exp_manager.explicit_log_dir={tmp_path / 'dense'}", "trainer.devices=2",
                              "model.expert_model_parallel_size=2"], nproc=2, timeout=600)
    assert dense.returncode != 0
    assert "model.expert_model_parallel_size=2 needs a mixture-of-experts model" in dense.stdout + dense.stderr
    odd = torchrun(script, [*data_overrides(movie_data, "sft"), *MOE,
                            f"exp_manager.explicit_log_dir={tmp_path / 'odd'}", "trainer.devices=2",
                            "model.expert_model_parallel_size=4"], nproc=2, timeout=600)
    assert odd.returncode != 0
    assert "model.expert_model_parallel_size=4 must be >= 1 and divide the data-parallel size 2" in \
        odd.stdout + odd.stderr
