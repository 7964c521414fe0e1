"""The real-model recipes' wiring (examples/nlp/gpt/run_smollm2_grpo.py and run_smollm2_dpo.py,
--quick): SmolLM2-135M-Instruct from its HF directory through chat-templated GRPO on arithmetic
and chat-templated DPO on movie-review pairs; a finite loss, weights that moved, and an export
that plain transformers loads and generates from. The full recipes are documented commands with
their numbers in the README, not CI."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.e2e.conftest import SCRIPTS, read_metrics
from tests.integration.test_smollm2 import _require_smollm2
from tests.launch import REPO, child_env


def _run_quick_recipe(script: str, out) -> dict:
    _require_smollm2()
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=str(REPO),
                          env=child_env(ALIGNER_NUM_THREADS="2", OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def _assert_export_moved(export_dir) -> None:
    """The policy changed, by small steps: the export differs from the model it started from."""
    from safetensors.torch import load_file

    from aligner.models.hf import gguf

    start = load_file(str(gguf.smollm2_hf_dir() / "model.safetensors"))
    exported = load_file(str(export_dir / "model.safetensors"))
    assert start.keys() == exported.keys()
    moved = [k for k in start if not torch.equal(start[k], exported[k])]
    assert len(moved) > len(start) // 2, (len(moved), len(start))
    assert max((start[k] - exported[k]).abs().max().item() for k in moved) < 1e-2  # small steps, not garbage


@pytest.mark.slow
def test_quick_grpo_recipe_trains_and_exports(tmp_path):
    out = tmp_path / "smollm2"
    summary = _run_quick_recipe("run_smollm2_grpo.py", out)
    assert set(summary["accuracy_by_step"]) == {"0", "2"}, summary
    assert all(0.0 <= v <= 1.0 for v in summary["accuracy_by_step"].values())
    rows = read_metrics(out / "grpo")
    losses = [r["train/policy_loss"] for r in rows if "train/policy_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), rows
    _assert_export_moved(out / "hf_export")
    # transformers loaded the export and answered a held-out problem through the chat template
    sample = summary["transformers_sample"]
    assert sample["prompt"].startswith("What is ") and isinstance(sample["response"], str) and sample["response"]
    assert (out / "grpo" / "curves.png").is_file()


@pytest.mark.slow
def test_quick_dpo_recipe_trains_and_exports(tmp_path):
    out = tmp_path / "smollm2_dpo"
    summary = _run_quick_recipe("run_smollm2_dpo.py", out)
    rows = read_metrics(out / "dpo")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), rows
    _assert_export_moved(out / "hf_export")
    # the trainer's held-out implicit-reward accuracy (our model code) and the recipe's own, from
    # transformers' model code on the exported weights, rank the same first pairs
    trainer_accuracy = summary["trainer_last_validation"]["val/preference_accuracy"]
    assert summary["implicit_reward_accuracy_after"] == pytest.approx(trainer_accuracy), summary
    for key in ("likelihood_preference_accuracy_before", "likelihood_preference_accuracy_after",
                "positive_fraction_before", "positive_fraction_after"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary)
    assert all(isinstance(s["after"], str) and s["after"] for s in summary["samples"]), summary["samples"]
    # the training pairs went through SmolLM2's own chat template
    first = json.loads((out / "data" / "chat_comparisons_train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["prompt"]] == ["user"] and first["chosen"][0]["role"] == "assistant"
    assert (out / "dpo" / "curves.png").is_file()
