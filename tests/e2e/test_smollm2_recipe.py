"""The real-model recipe's wiring (examples/nlp/gpt/run_smollm2_grpo.py --quick): SmolLM2-135M-
Instruct from its HF directory through chat-templated GRPO on arithmetic, a finite loss, weights
that moved, and an export that plain transformers loads and generates from. The full recipe (40
steps, 200 held-out problems) is a documented command with its numbers in the README, not CI."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.e2e.conftest import SCRIPTS, read_metrics
from tests.integration.test_smollm2 import _require_smollm2
from tests.launch import REPO, child_env


@pytest.mark.slow
def test_quick_recipe_trains_and_exports(tmp_path):
    _require_smollm2()
    from safetensors.torch import load_file

    from aligner.models.hf import gguf

    out = tmp_path / "smollm2"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "run_smollm2_grpo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=str(REPO),
                          env=child_env(ALIGNER_NUM_THREADS="2", OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy_by_step"]) == {"0", "2"}, summary
    assert all(0.0 <= v <= 1.0 for v in summary["accuracy_by_step"].values())
    rows = read_metrics(out / "grpo")
    losses = [r["train/policy_loss"] for r in rows if "train/policy_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), rows
    # the policy changed: the export differs from the model it started from
    start = load_file(str(gguf.smollm2_hf_dir() / "model.safetensors"))
    exported = load_file(str(out / "hf_export" / "model.safetensors"))
    assert start.keys() == exported.keys()
    moved = [k for k in start if not torch.equal(start[k], exported[k])]
    assert len(moved) > len(start) // 2, (len(moved), len(start))
    assert max((start[k] - exported[k]).abs().max().item() for k in moved) < 1e-2  # small steps, not garbage
    # transformers loaded the export and answered a held-out problem through the chat template
    sample = summary["transformers_sample"]
    assert sample["prompt"].startswith("What is ") and isinstance(sample["response"], str) and sample["response"]
    assert (out / "grpo" / "curves.png").is_file()
